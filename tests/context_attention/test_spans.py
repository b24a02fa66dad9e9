"""Emphasised spans: markers, message location in a rendered chat, token mapping (embedded tokenizer)."""

import pytest

from steerserve.patches.steers.context_attention import spans
from steerserve.server.schema import ModelInfo, SteerError, normalise

INFO = ModelInfo("SteerableLlamaForCausalLM", 30, 1536, True, num_heads=9, attention_steerable=True)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from steerserve.server.model_store import ensure_embedded_model

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


def test_strip_markers():
    assert spans.strip_markers("a <emphasis>bc</emphasis> d<emphasis>e</emphasis>") == ("a bc de", [(2, 4), (6, 7)])
    assert spans.strip_markers("plain") == ("plain", [])
    for bad, msg in [("<emphasis>x", "never closed"), ("x</emphasis>", "no matching"),
                     ("<emphasis>a<emphasis>b</emphasis></emphasis>", "nest")]:
        with pytest.raises(spans.SpanError, match=msg):
            spans.strip_markers(bad)


def _emphasised_text(tok, ids, found):
    return ["".join(tok.decode(ids[a:b])) for a, b in found]


def test_user_mode_emphasises_user_content_only(tok):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "The sky on Mars is butterscotch."},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": "What colour is the sky on Mars?"}]
    ids, found = spans.chat_spans(tok, msgs, "user")
    assert _emphasised_text(tok, ids, found) == [msgs[1]["content"], msgs[3]["content"]]
    ids, last = spans.chat_spans(tok, msgs, "last_user")
    assert _emphasised_text(tok, ids, last) == [msgs[3]["content"]]
    assert last[-1][1] < len(ids) - 3  # the generation prefix "<|im_end|>\n<|im_start|>assistant\n" is not emphasised


def test_default_system_prompt_containing_the_content_does_not_confuse_location(tok):
    """SmolLM2's template inserts a default system prompt; a user message that also occurs in it
    ("a") is still found where the user wrote it."""
    ids, found = spans.chat_spans(tok, [{"role": "user", "content": "a"}], "user")
    (span,) = found
    text = tok.decode(ids)
    assert "You are a helpful AI assistant" in text  # the template's default system prompt
    assert tok.decode(ids[: span[0]]).endswith("<|im_start|>user\n")


def test_marked_mode_and_text_parts(tok):
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "Doc: <emphasis>Paris is in Texas.</emphasis>"},
        {"type": "text", "text": "Where is <emphasis>Paris</emphasis>?"}]}]
    ids, found = spans.chat_spans(tok, msgs, "marked")
    assert [t.strip() for t in _emphasised_text(tok, ids, found)] == ["Paris is in Texas.", "Paris"]
    assert "<emphasis>" not in tok.decode(ids)
    with pytest.raises(spans.SpanError, match="none found"):
        spans.chat_spans(tok, [{"role": "user", "content": "nothing marked"}], "marked")


def test_empty_user_content_is_refused(tok):
    with pytest.raises(spans.SpanError, match="has none"):
        spans.chat_spans(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": ""}], "user")


def test_token_ids_must_match_the_engine_prompt(tok):
    with pytest.raises(spans.SpanError, match="re-tokenise"):
        spans.tokenise_with_offsets(tok, "hello world", [1, 2, 3])


def test_template_that_rewrites_text_is_detected():
    with pytest.raises(spans.SpanError, match="rewrites"):
        spans.message_ranges("<u>HELLO</u>", "<u>\ue0000\ue001</u>", {0: "hello"})


@pytest.mark.parametrize("steer,field,fragment", [
    ({"context_attention": {"alpha": 0}}, "steer.context_attention.alpha", "(0, 1]"),
    ({"context_attention": {"alpha": 1.5}}, "steer.context_attention.alpha", "(0, 1]"),
    ({"context_attention": {"layers": [30]}}, "steer.context_attention.layers[0]", "0..29"),
    ({"context_attention": {"heads": [[0, 9]]}}, "steer.context_attention.heads[0]", "head 9 out of range"),
    ({"context_attention": {"heads": [[0]]}}, "steer.context_attention.heads[0]", "[layer, head]"),
    ({"context_attention": {"heads": "missing"}}, "steer.context_attention.heads", "unknown head set"),
    ({"context_attention": {"heads": [[3, 1]], "layers": [4]}}, "steer.context_attention.heads", "do not intersect"),
    ({"context_attention": {"emphasis": "everything"}}, "steer.context_attention.emphasis", "user"),
    ({"context_attention": {"gain": 2}}, "steer.context_attention.gain", "allowed keys"),
])
def test_context_attention_400s_name_the_field(steer, field, fragment):
    with pytest.raises(SteerError) as err:
        normalise(steer, INFO, {"focus": ((1, 2),)})
    assert err.value.field == field and fragment in err.value.message


def test_context_attention_normalisation():
    plan = normalise({"context_attention": {"alpha": 0.5, "heads": "focus", "layers": [1, 2]}}, INFO,
                     {"focus": ((1, 2), (1, 0), (5, 5))}).context_attention
    assert plan.heads == ((1, (0, 2)),) and plan.head_set == "focus" and plan.emphasis == "user"
    default = normalise({"context_attention": {}}, INFO, {"default": ((3, 4),)}).context_attention
    assert default.heads == ((3, (4,)),) and default.alpha == 0.7 and default.head_set == "default"
    every = normalise({"context_attention": {}}, INFO).context_attention  # no default set: all heads
    assert len(every.heads) == 30 and every.alpha == 0.9
    assert normalise({"context_attention": {"heads": [[1, 1]]}}, INFO).context_attention.alpha == 0.9
    assert normalise({"context_attention": {"alpha": 1.0}}, INFO).is_empty
    with pytest.raises(SteerError, match="marked"):
        normalise({"context_attention": {}}, INFO, endpoint="completions")
    assert normalise({"context_attention": {"emphasis": "marked"}}, INFO, endpoint="completions").context_attention
    gpt2 = ModelInfo("GPT2LMHeadModel", 12, 3072, False, num_heads=12)
    with pytest.raises(SteerError, match="no steering support"):
        normalise({"context_attention": {}}, gpt2)
