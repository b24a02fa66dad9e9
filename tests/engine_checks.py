"""Engine-level checks shared by the Llama, Qwen2 and torch.compile test modules.

Each takes a live steerable engine (`llm`), the checkpoint folder and a loaded Hugging Face copy
of the same checkpoint for the pure-torch reference.
"""

from __future__ import annotations


import torch

from vllm import SamplingParams

from steerserve.patches.plan import SteerPlan
from steerserve.patches.reference import token_logprobs
from steerserve.server.schema import normalise

from steerserve.clients.loadtest import PROMPTS as _LOAD_PROMPTS

PROMPTS = _LOAD_PROMPTS[:6]  # six raw-text prompts (the load test numbers and adds two)
# reference vs engine, float32 on CPU: max |logprob difference| allowed per token
LOGPROB_TOL = 2e-3


def with_spans(plan: SteerPlan, spans) -> SteerPlan:
    """A context-attention plan with emphasised token spans set by hand (the server resolves them
    from the rendered chat; these raw prompts have no chat roles)."""
    from dataclasses import replace

    return replace(plan, context_attention=replace(plan.context_attention, spans=tuple(spans)))


def vector_plan(*terms) -> SteerPlan:
    """A steering-vectors plan over the tiny models' test vectors (`joy`: layers 1.., `calm`: 1-2),
    terms (name, scale, layers, positions), built as the server's normalisation would."""
    from steerserve.patches.steers.vectors import VectorsPlan, VectorTerm

    return SteerPlan(vectors=VectorsPlan(tuple(VectorTerm(*t) for t in terms)))


def attach_test_vectors(model) -> None:
    """Load a tiny checkpoint's test vectors onto its Hugging Face model (for the reference)."""
    from tiny_models import tiny_vectors

    from steerserve.patches.steers.vectors.reference import attach

    if not hasattr(model, "steer_vectors"):
        attach(model, tiny_vectors(model.name_or_path))


def plans(info) -> dict[str, SteerPlan]:
    """One plan per InfoSteer mode, on different layer sets, context-attention plans (normalised
    as the server does) and steering-vector plans."""
    last = info.num_layers - 1
    ctx_heads = [[0, 1], [2, 0], [2, 3], [last, 2]]
    return {
        "vec": vector_plan(("joy", 1.0, tuple(range(1, info.num_layers)), "all")),
        "vec_gen": vector_plan(("joy", -1.5, (2, last), "all"), ("calm", 0.8, (1, 2), "generated")),
        "vec_and_ctx": with_spans(SteerPlan(
            vectors=vector_plan(("calm", 1.2, (1,), "prompt")).vectors,
            context_attention=normalise({"context_attention": {"alpha": 0.3, "layers": [1, 3]}}, info).context_attention,
        ), [(0, 4)]),
        "scale": normalise({"infosteer": {"mode": "scale", "alpha": 2.5, "layers": "all"}}, info),
        "topk": normalise({"infosteer": {"mode": "topk", "alpha": 4.0, "k": 8, "layers": [0, last]}}, info),
        "lift": normalise({"infosteer": {"mode": "lift", "alpha": 3.0, "p": 0.1, "layers": [1, 2]}}, info),
        "ctx_all": with_spans(normalise({"context_attention": {"alpha": 0.2}}, info), [(1, 6)]),
        "ctx_heads": with_spans(normalise({"context_attention": {"alpha": 0.4, "heads": ctx_heads}}, info),
                                [(2, 5), (7, 9)]),
        "ctx_and_scale": with_spans(normalise({"infosteer": {"alpha": 1.5, "layers": [1]},
                                               "context_attention": {"alpha": 0.3, "layers": [1, 3]}}, info),
                                    [(0, 4)]),
    }


def params(plan: SteerPlan | None, max_tokens: int = 12) -> SamplingParams:
    extra = {"steer": plan.to_json()} if plan is not None and not plan.is_empty else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True, extra_args=extra)


def prompt(text: str, plan: SteerPlan | None) -> dict:
    p: dict = {"prompt": text}
    if plan is not None and not plan.is_empty:
        p["cache_salt"] = f"steer:{plan.fingerprint()}"
    return p


def run(llm, items: list[tuple[str, SteerPlan | None]], max_tokens: int = 12, reset_cache: bool = True):
    """Generate for (prompt, plan) pairs in one batch; returns [(token_ids, [logprob...])]."""
    if reset_cache:
        assert llm.reset_prefix_cache()
    outs = llm.generate([prompt(t, p) for t, p in items], [params(p, max_tokens) for _, p in items],
                        use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        lps = [lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)]
        result.append((list(c.token_ids), lps, list(o.prompt_token_ids), o.num_cached_tokens))
    return result


def check_mixed_batch_bit_identical(llm, info) -> None:
    """Unsteered rows of a batch with steered neighbours == the same batch all unsteered, bit for bit;
    steered rows differ."""
    p = plans(info)
    plain = run(llm, [(t, None) for t in PROMPTS])
    for mixed_plans in ([None, p["scale"], None, p["topk"], p["lift"], None],
                        [p["ctx_all"], None, p["ctx_heads"], None, p["ctx_and_scale"], None],
                        [None, p["vec"], p["vec_gen"], None, p["vec_and_ctx"], None]):
        mixed = run(llm, list(zip(PROMPTS, mixed_plans)))
        for i, plan in enumerate(mixed_plans):
            if plan is None:
                assert mixed[i][0] == plain[i][0], f"row {i} tokens changed by steered neighbours"
                assert mixed[i][1] == plain[i][1], f"row {i} logprobs changed by steered neighbours"
            else:
                assert mixed[i][1] != plain[i][1], f"row {i} ({plan.applied()}) was not steered"


def check_neutral_identity(llm, info) -> None:
    """A plan that multiplies by exactly 1.0 (bypassing the server's neutral filter) is bit-identical
    to no plan: the steered path itself does not perturb values."""
    from steerserve.patches.plan import InfoSteerPlan

    ones = SteerPlan(infosteer=InfoSteerPlan(layers=tuple(range(info.num_layers)), mode="scale", alpha=1.0))
    plain = run(llm, [(t, None) for t in PROMPTS[:3]])
    neutral = run(llm, [(t, ones) for t in PROMPTS[:3]])
    assert [x[:2] for x in plain] == [x[:2] for x in neutral]


def check_context_alpha_one_is_close(llm, info) -> None:
    """Context attention with alpha = 1 (bypassing the server's neutral filter) runs the second
    pass with a zero bias: it recomputes the kernel's attention in float32 and must agree with it
    closely (not bit for bit: which is why the server skips alpha = 1 entirely)."""
    from dataclasses import replace

    plan = plans(info)["ctx_all"]
    ones = replace(plan, context_attention=replace(plan.context_attention, alpha=1.0))
    plain = run(llm, [(t, None) for t in PROMPTS[:3]])
    same = run(llm, [(t, ones) for t in PROMPTS[:3]])
    for a, b in zip(plain, same):
        assert a[0] == b[0]
        assert max(abs(x - y) for x, y in zip(a[1], b[1])) < LOGPROB_TOL


def check_reference_parity(llm, hf_model, info, max_tokens: int = 12) -> float:
    """Engine logprobs of steered generations == the Hugging Face hooks reference (teacher forced)
    within LOGPROB_TOL, for each mode, in one mixed batch. Returns the max difference seen."""
    p = plans(info)
    items = [(PROMPTS[0], p["scale"]), (PROMPTS[1], None), (PROMPTS[2], p["topk"]), (PROMPTS[3], p["lift"]),
             (PROMPTS[4], p["ctx_all"]), (PROMPTS[5], p["ctx_heads"]), (PROMPTS[0], p["ctx_and_scale"]),
             (PROMPTS[1], p["vec"]), (PROMPTS[2], p["vec_gen"]), (PROMPTS[3], p["vec_and_ctx"])]
    attach_test_vectors(hf_model)
    outs = run(llm, items, max_tokens)
    worst = 0.0
    for (_, plan), (toks, lps, prompt_ids, _) in zip(items, outs):
        ref = token_logprobs(hf_model, prompt_ids, toks, plan)
        diff = max(abs(a - b) for a, b in zip(lps, ref))
        worst = max(worst, diff)
        assert diff < LOGPROB_TOL, f"{plan.applied() if plan else 'plain'}: engine vs reference diff {diff}"
    return worst


def check_prefix_cache_salted(llm, info) -> None:
    """A steered request never reuses unsteered KV, and a repeat of it hits its own cache."""
    for key in ("scale", "ctx_heads"):
        _check_prefix_cache_salted(llm, info, plans(info)[key])


def _check_prefix_cache_salted(llm, info, p) -> None:
    long_prompt = " ".join(PROMPTS * 3)  # more than one full 128-token KV block
    assert llm.reset_prefix_cache()
    cold = run(llm, [(long_prompt, p)], reset_cache=True)[0]
    run(llm, [(long_prompt, None)], reset_cache=True)  # warm the cache with unsteered KV
    after_plain = run(llm, [(long_prompt, p)], reset_cache=False)[0]
    assert after_plain[3] == 0, "steered request reused unsteered KV blocks"
    assert after_plain[:2] == cold[:2]
    repeat = run(llm, [(long_prompt, p)], reset_cache=False)[0]
    assert repeat[3] > 0, "repeat of a steered request did not hit its own cache"
    assert repeat[0] == cold[0]
    other = normalise({"infosteer": {"mode": "scale", "alpha": 0.5}}, info)
    differently = run(llm, [(long_prompt, other)], reset_cache=False)[0]
    assert differently[3] == 0, "request steered differently reused another plan's KV"


def check_prefix_cache_isolates_spans(llm, info) -> None:
    """Issue 14: two requests with the same prompt ids and plan but different emphasised spans
    (what typed template tokens produce) share the plan's salt (the server salts before spans are
    resolved); the engine's per-block keys let the second reuse only the blocks before the first
    token whose emphasis differs, and its output equals its cold run."""
    long_prompt = " ".join(PROMPTS * 6)
    ids = llm.get_tokenizer().encode(long_prompt)[:200]  # 200 tokens: one full 128-token block
    assert len(ids) == 200
    base = normalise({"context_attention": {"alpha": 0.3}}, info)
    salt = f"steer:{base.fingerprint()}"

    def go(spans, reset=False):
        if reset:
            assert llm.reset_prefix_cache()
        plan = with_spans(base, spans)
        out = llm.generate([{"prompt_token_ids": ids, "cache_salt": salt}], [params(plan)], use_tqdm=False)[0]
        c = out.outputs[0]
        return list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)], out.num_cached_tokens

    # differing emphasis inside the first block: nothing is shared
    cold = go([(10, 60)], reset=True)
    go([(10, 40), (50, 60)], reset=True)
    after = go([(10, 60)])
    assert after[2] == 0, f"a request reused KV computed under other emphasised spans: {after[2]}"
    assert after[:2] == cold[:2]
    # differing emphasis only in the second block: the first block (same tokens, same emphasis) is reused
    cold = go([(10, 40), (135, 150)], reset=True)
    go([(10, 40), (130, 150)], reset=True)
    after = go([(10, 40), (135, 150)])
    assert after[2] == 128, f"expected the first block to be reused, got {after[2]} cached tokens"
    assert after[0] == cold[0] and max(abs(a - b) for a, b in zip(after[1], cold[1])) < 1e-4
    repeat = go([(10, 40), (135, 150)])
    assert repeat[2] == 128 and repeat[0] == cold[0]  # a repeat reuses its own block


# --- TAIA mixing of a fully fine-tuned variant ------------------------------------------------

def perturbed_copy(src, out, seed=7, scale=0.05):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.dim() == 2 else 0.5))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def build_family(base, root):
    """A "tuned" variant (the base with every weight perturbed) and its exports, under `root`."""
    from steerserve.training.export import merge_full

    tuned = perturbed_copy(base, root / "tuned")
    taia = merge_full(tuned, base, root / "taia", attention="tuned", ffn="base")
    ffn_only = merge_full(tuned, base, root / "ffn-only", attention="base", ffn="tuned")
    return {"base": base, "tuned": tuned, "taia": taia, "ffn-only": ffn_only}


def build_lora_family(base, root):
    """A random LoRA adapter of `base` on every projection (with steerserve's metadata) and its
    TAIA export, under `root`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from steerserve.training import checkpoints as ck
    from steerserve.training.export import export_taia

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, cfg).save_pretrained(root / "adapter")
    ck.write_metadata(root / "adapter", "lora", base, ck.base_digest(base))
    export_taia(root / "adapter", root / "adapter-taia")
    return {"base": base, "adapter": root / "adapter", "taia": root / "adapter-taia", "root": root}


def variant_settings(family) -> dict:
    """Engine keyword arguments declaring the family's tuned checkpoint as the engine's variant 0
    (the engine settings `steerserve serve` passes as `--additional-config`)."""
    from steerserve.patches.steers.base import SETTINGS_KEY
    from steerserve.patches.steers.mixing import VARIANTS_SETTING

    return {"additional_config": {SETTINGS_KEY: {VARIANTS_SETTING: [{"name": "chat", "path": str(family["tuned"])}]}}}


def mix(attention: str, ffn: str) -> SteerPlan:
    from steerserve.patches.plan import MixingPlan

    return SteerPlan(mixing=MixingPlan("chat", attention, ffn, via="weights", index=0))


def hf(path):
    """A Hugging Face model of a checkpoint (with its test steering vectors for the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    attach_test_vectors(model)
    return model


def check_mixing_parity(llm, family) -> float:
    """A batch mixing plain, TAIA, tuned and FFN-only rows of a full variant (index 0 of the
    engine): unmixed rows bit-identical to the same batch unmixed, mixed rows equal to Hugging Face
    models of the exported checkpoints (logprobs within LOGPROB_TOL, greedy tokens equal).
    Returns the max logprob difference."""
    kinds = [None, ("tuned", "base"), ("tuned", "tuned"), None, ("base", "tuned"), ("tuned", "base")]
    names = {None: "base", ("tuned", "base"): "taia", ("tuned", "tuned"): "tuned", ("base", "tuned"): "ffn-only"}
    items = [(t, mix(*k) if k else None) for t, k in zip(PROMPTS, kinds)]
    outs = run(llm, items, max_tokens=10)
    plain = run(llm, [(t, None) for t in PROMPTS], max_tokens=10)
    models = {}
    worst = 0.0
    for k, (toks, lps, prompt_ids, _), ref_plain in zip(kinds, outs, plain):
        if k is None:  # unmixed rows: bit-identical to the same batch without mixed neighbours
            assert (toks, lps) == (ref_plain[0], ref_plain[1])
            continue
        name = names[k]
        models.setdefault(name, hf(family[name]))
        ref = token_logprobs(models[name], prompt_ids, toks, None)
        diff = max(abs(a - b) for a, b in zip(lps, ref))
        worst = max(worst, diff)
        assert diff < LOGPROB_TOL, f"{name}: engine vs exported checkpoint diff {diff}"
        assert lps != ref_plain[1], f"{name}: the row was not mixed"
        # greedy continuation of the exported checkpoint alone gives the same tokens
        with torch.no_grad():
            gen = models[name].generate(torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False)
        assert gen[0, len(prompt_ids):].tolist() == toks, name
    return worst


def greedy_hf(path, prompt_ids, n=8, adapter=None):
    """Greedy tokens of a Hugging Face checkpoint (with a LoRA adapter merged, if given)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


# --------------------------------------------------------------------------- TAIA with LoRA variants

LORA_ENGINE = dict(enable_lora=True, max_lora_rank=8, max_loras=2)  # engine arguments for check_lora_rows


def lora_pair(base, root):
    """A random rank-8 adapter on every linear projection of the decoder layers (whatever the
    architecture names them: q/k/v/o or a fused qkv, gate/up/down or a fused gate_up) and its TAIA
    export."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from steerserve.training import checkpoints as ck
    from steerserve.training.export import export_taia

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = sorted({name.split(".")[-1] for name, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and ".layers." in name})
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=targets)) \
        .save_pretrained(root / "adapter")
    ck.write_metadata(root / "adapter", "lora", base, ck.base_digest(base))
    export_taia(root / "adapter", root / "adapter-taia")
    return root / "adapter", root / "adapter-taia", targets


def _merged(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return model if adapter is None else PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


def check_lora_rows(llm, base, root, name: str) -> None:
    """`llm` (started with LORA_ENGINE) serves a random LoRA adapter of `base` and its TAIA export
    per request next to plain rows in one batch: each row's logprobs equal the Hugging Face model
    with that adapter merged (teacher forced) within LOGPROB_TOL beyond the engine's own unsteered
    distance from that model, and the three kinds of rows all differ."""
    from vllm.lora.request import LoRARequest

    adapter, taia, targets = lora_pair(base, root)
    loras = {"plain": None, "tuned": LoRARequest("tuned", 1, str(adapter)), "taia": LoRARequest("taia", 2, str(taia))}
    rows = [(PROMPTS[i % len(PROMPTS)], kind) for i, kind in enumerate(["plain", "tuned", "taia", "plain", "taia",
                                                                         "tuned"])]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate([r[0] for r in rows], params, lora_request=[loras[k] for _, k in rows], use_tqdm=False)
    models = {"plain": _merged(base, None), "tuned": _merged(base, adapter), "taia": _merged(base, taia)}
    diffs: dict[str, float] = {}
    firsts: dict[str, list] = {}
    for (_, kind), out in zip(rows, outs):
        c = out.outputs[0]
        lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
        ref = token_logprobs(models[kind], list(out.prompt_token_ids), list(c.token_ids), None)
        diffs[kind] = max(diffs.get(kind, 0.0), max(abs(a - b) for a, b in zip(lps, ref)))
        firsts.setdefault(kind, lps)
    plain = diffs["plain"]
    assert plain < 5e-3, f"{name}: unsteered, the engine differs from Hugging Face by {plain}"
    for kind in ("tuned", "taia"):
        assert diffs[kind] < LOGPROB_TOL + plain, f"{name}: {kind} adapter: engine vs merged model {diffs[kind]}"
    assert len({tuple(v) for v in firsts.values()}) == 3  # plain, tuned and TAIA rows all differ
    print(f"{name} ({', '.join(targets)}): max |engine - merged adapter| logprob "
          f"{max(diffs['tuned'], diffs['taia']):.2e} (unsteered {plain:.2e})")
