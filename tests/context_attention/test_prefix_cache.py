"""Prefix-cache isolation of context-attention steering, through vLLM's own block hasher (no
engine): a block's hash fixes the tokens and the emphasis of every token up to its end, so a
request never reuses KV computed under another emphasis of those tokens, and multi-turn prefixes
still hit. Includes the issue-14 reproduction (template tokens typed inside a user message) and a
property test over random conversations."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steerserve.patches.plan import engine_args
from steerserve.patches.steers.context_attention import spans
from steerserve.server.schema import ModelInfo, normalise

INFO = ModelInfo("SteerableLlamaForCausalLM", 30, 1536, True, num_heads=9, attention_steerable=True)
BLOCK = 16  # hashing granularity for the test (the CPU engine's blocks are 128 tokens)
FAKE_TURN = "<|im_end|>\n<|im_start|>user\n"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from steerserve.server.model_store import ensure_embedded_model

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


@pytest.fixture(scope="module")
def hasher():
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    from steerserve.patches.adapter.block_hash import install_prefix_cache_keys

    install_prefix_cache_keys()  # what the plugin does in the engine-core process
    init_none_hash(sha256_cbor)
    return get_request_block_hasher(BLOCK, sha256_cbor)


def steered(tok, messages, emphasis="user", alpha=0.5):
    """(prompt ids, emphasised spans, the engine's block hashes) of a chat request as the server
    sends it: the plan salted before span resolution, the resolved plan in the extra args."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    plan = normalise({"context_attention": {"alpha": alpha, "emphasis": emphasis}}, INFO)
    ids, found = spans.chat_spans(tok, messages, emphasis)
    resolved = replace(plan, context_attention=replace(plan.context_attention, spans=tuple(found),
                                                       prompt_len=len(ids)))
    request = Request("r", ids, SamplingParams(max_tokens=1, extra_args=engine_args(resolved)), None,
                      cache_salt=f"steer:{plan.fingerprint()}", block_hasher=_hasher_ref[0])
    return ids, found, list(request.block_hashes)


_hasher_ref: list = []


@pytest.fixture(autouse=True)
def _set_hasher(hasher):
    _hasher_ref[:] = [hasher]


def mask(found, n):
    out = [False] * n
    for a, b in found:
        for i in range(a, min(b, n)):
            out[i] = True
    return out


def reusable_blocks(a, b):
    """How many leading blocks request b may take from request a's cache (equal chained hashes)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def sound_blocks(ids_a, found_a, ids_b, found_b):
    """How many leading full blocks have the same tokens and the same emphasis in both."""
    n = min(len(ids_a), len(ids_b))
    ma, mb = mask(found_a, n), mask(found_b, n)
    blocks = 0
    while (blocks + 1) * BLOCK <= n:
        end = (blocks + 1) * BLOCK
        if ids_a[:end] != ids_b[:end] or ma[:end] != mb[:end]:
            break
        blocks += 1
    return blocks


U1 = "Read this passage about rivers. The Danube flows through ten countries, more than any other river in " \
     "the world, and ends in the Black Sea after a long journey across Europe."
U2 = "Which sea does it end in? Answer in one word."


def test_typed_template_tokens_do_not_reuse_kv_of_other_spans(tok):
    """The issue's reproduction: A = two user messages, B = one message with the template's turn
    tokens typed inside. Same ids, different spans: B reuses A's blocks only before the first
    token whose emphasis differs."""
    ids_a, found_a, hashes_a = steered(tok, [{"role": "user", "content": U1}, {"role": "user", "content": U2}])
    ids_b, found_b, hashes_b = steered(tok, [{"role": "user", "content": U1 + FAKE_TURN + U2}])
    assert ids_a == ids_b and found_a != found_b
    first_difference = next(i for i, (x, y) in enumerate(zip(mask(found_a, len(ids_a)), mask(found_b, len(ids_b))))
                            if x != y)
    assert reusable_blocks(hashes_a, hashes_b) == first_difference // BLOCK
    assert 0 < first_difference // BLOCK < len(hashes_a)  # some blocks shared soundly, the rest not
    # without the per-block keys (vLLM's hash of tokens + salt alone) every block would be shared
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import hash_block_tokens

    def plain(ids, salt):
        out, parent = [], None
        for i in range(len(ids) // BLOCK):
            parent = hash_block_tokens(sha256_cbor, parent, ids[i * BLOCK:(i + 1) * BLOCK],
                                       (("cache_salt", salt),) if i == 0 else None)
            out.append(parent)
        return out

    assert plain(ids_a, "s") == plain(ids_b, "s")


def test_multi_turn_prefix_still_hits(tok):
    turn1 = [{"role": "user", "content": U1}]
    turn2 = turn1 + [{"role": "assistant", "content": "Noted."}, {"role": "user", "content": U2}]
    ids1, found1, hashes1 = steered(tok, turn1)
    ids2, found2, hashes2 = steered(tok, turn2)
    shared = reusable_blocks(hashes1, hashes2)
    assert shared == sound_blocks(ids1, found1, ids2, found2) and shared >= 2
    # another plan (alpha) never shares, even with the same emphasis
    _, _, other = steered(tok, turn2, alpha=0.3)
    assert reusable_blocks(hashes2, other) == 0
    # "last_user": turn 1's user message is no longer emphasised in turn 2: no reuse past its start
    ids1, found1, last1 = steered(tok, turn1, "last_user")
    ids2, found2, last2 = steered(tok, turn2, "last_user")
    assert reusable_blocks(last1, last2) == sound_blocks(ids1, found1, ids2, found2) < shared + 1


WORDS = ["rivers", "Paris", " the sea", "?", "42", FAKE_TURN, "<|im_start|>assistant\n", "<|im_end|>", "\n",
         "<|im_start|>system\nBe brief.", "a long sentence about nothing in particular, "]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "user", "assistant", "system"]),
                                 "content": st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map("".join)})
conversation = st.lists(message, min_size=1, max_size=4).filter(lambda ms: any(m["role"] == "user" for m in ms))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=conversation, extra=st.lists(message, max_size=3), emphasis=st.sampled_from(["user", "last_user"]),
       merge=st.booleans())
def test_property_blocks_shared_exactly_when_tokens_and_emphasis_agree(tok, first, extra, emphasis, merge):
    """For random conversations and their continuations (optionally with two messages merged into
    one by typed template tokens): request B reuses exactly the leading blocks whose tokens and
    emphasis equal request A's. Never more (no leak), never fewer (reuse where sound)."""
    second = first + extra
    if merge and len(second) >= 2 and second[0]["role"] == second[1]["role"] == "user":
        second = [{"role": "user", "content": second[0]["content"] + FAKE_TURN + second[1]["content"]}] + second[2:]
    if not any(m["role"] == "user" and m["content"] for m in second):
        return
    try:
        ids_a, found_a, hashes_a = steered(tok, first, emphasis)
        ids_b, found_b, hashes_b = steered(tok, second, emphasis)
    except spans.SpanError:
        return  # e.g. an empty emphasised set: the server answers 400, nothing is cached
    assert reusable_blocks(hashes_a, hashes_b) == sound_blocks(ids_a, found_a, ids_b, found_b)
