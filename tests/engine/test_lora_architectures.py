"""TAIA with LoRA variants on every architecture of the support matrix: vLLM's multi-LoRA serves a
random LoRA adapter on every linear projection of a tiny random checkpoint and its TAIA export
(`steerserve train export-taia`: the attention modules' LoRA only), per request, next to plain rows
in one batch (float32, eager). Each row's logprobs equal the Hugging Face model of the same
checkpoint with that adapter merged (teacher forced), within LOGPROB_TOL beyond the engine's own
unsteered distance from that model; the two adapters change the output differently.

These results fill the matrix's "TAIA, LoRA variants" column (docs/architectures.md, generated from
`patches/architectures.py`: LORA_TESTED)."""

from __future__ import annotations

import pytest
import torch
from conftest import close_engine, make_engine
from engine_checks import LOGPROB_TOL, PROMPTS
from tiny_models import build_tiny

from steerserve.patches.architectures import LORA_TESTED
from steerserve.patches.reference import token_logprobs

pytestmark = pytest.mark.engine

TINY = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM",
        "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


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


def merged(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return model if adapter is None else PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


@pytest.mark.parametrize("name", list(TINY))
def test_lora_and_its_taia_export_per_request(name, tmp_path):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    assert TINY[name] in LORA_TESTED  # the matrix says what this test shows
    base = build_tiny(name, tmp_path / name)
    adapter, taia, targets = lora_pair(base, tmp_path)
    llm = make_engine(base, enable_lora=True, max_lora_rank=8, max_loras=2, max_num_batched_tokens=64,
                      max_model_len=256)
    try:
        loras = {"plain": None, "tuned": LoRARequest("tuned", 1, str(adapter)),
                 "taia": LoRARequest("taia", 2, str(taia))}
        rows = [(PROMPTS[i % len(PROMPTS)], kind) for i, kind in enumerate(["plain", "tuned", "taia", "plain",
                                                                             "taia", "tuned"])]
        params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True)
        outs = llm.generate([r[0] for r in rows], params, lora_request=[loras[k] for _, k in rows], use_tqdm=False)
    finally:
        close_engine(llm)
    models = {"plain": merged(base, None), "tuned": merged(base, adapter), "taia": merged(base, taia)}
    diffs: dict[str, float] = {}
    firsts: dict[str, list] = {}
    for (text, kind), out in zip(rows, outs):
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
