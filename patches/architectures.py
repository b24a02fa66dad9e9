"""The architectures steerserve steers, and what each refuses (docs/architectures.md).

Steers attach to a vLLM decoder model by its structure (`patches/models.py`, `adapter/layers.py`,
`adapter/attention.py`): decoder layers (`input_layernorm`, `post_attention_layernorm`,
`self_attn`, `mlp`) whose output is the residual stream, whole or split into (hidden_states,
residual); gated MLPs (`gate_up_proj` -> `act_fn` -> `down_proj`); vLLM `Attention` layers; an LM
head. Any architecture listed here gets a steerable subclass of vLLM's own class, built when vLLM
asks for it; what an architecture does differently is either handled by the hook points or
refused below with the reason: per steer (a 400 naming the architecture), or for what the server
loads next to the model (a start-up refusal). Checkpoint-level facts refuse too (`refusals`):
sliding-window and soft-capped attention for context attention.

Every entry is tested on a tiny random checkpoint of its architecture
(`tests/engine/test_architectures.py`): each supported steer against its pure-torch reference,
unsteered rows bit-identical to stock vLLM, each refusal a 400.

Torch-free and vLLM-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROXY_LAYOUTS = "proxy tuning builds its experts with vLLM's Llama and Qwen2 classes"
ROUTED_ROWS = ("TAIA mixing of a fully fine-tuned variant routes whole token rows through each module; this "
               "architecture's {what} run on per-head rows or are norms the router does not wrap")
ROUTED_UNTESTED = ("TAIA mixing of fully fine-tuned variants is built and tested for the Llama and Qwen2 layouts "
                   "only")
# what the server loads, refused per architecture at start-up (`Architecture.cannot_load`)
FULL_VARIANTS, PROXY_PAIRS = "full_variants", "proxy_pairs"


@dataclass(frozen=True)
class Architecture:
    """`name`: the checkpoint's `architectures[0]` (vLLM's registry name); `refused`: steer name ->
    why requests carrying that steer get a 400 on it; `cannot_load`: what the server refuses to
    load next to it at start-up (`FULL_VARIANTS`, `PROXY_PAIRS`) -> why; `note`: what differs
    from Llama, for the support matrix."""

    name: str
    refused: dict[str, str] = field(default_factory=dict)
    cannot_load: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def steerable_name(self) -> str:
        return f"Steerable{self.name}"


def _new(name: str, note: str, routed: str | None = None) -> Architecture:
    """An architecture beyond Llama and Qwen2: proxy pairs refused (their experts' classes), and
    fully fine-tuned variants (`routed` names the modules that cannot be routed, where known)."""
    return Architecture(name, note=note, cannot_load={
        PROXY_PAIRS: PROXY_LAYOUTS, FULL_VARIANTS: ROUTED_ROWS.format(what=routed) if routed else ROUTED_UNTESTED})


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("LlamaForCausalLM", note="the reference layout (also SmolLM2, Llama 2/3.x)"),
    Architecture("Qwen2ForCausalLM", note="q/k/v biases"),
    _new("MistralForCausalLM", "vLLM's Llama classes; a sliding window when the checkpoint sets one"),
    _new("Qwen3ForCausalLM", "per-head q/k RMSNorm before RoPE", routed="q/k norms"),
    _new("Phi3ForCausalLM", "fused qkv and gate_up weights in the checkpoint (vLLM's Llama classes)"),
    _new("GraniteForCausalLM", "embedding, residual, attention and logit multipliers; decoder layers return the "
                               "whole residual stream"),
    _new("Gemma2ForCausalLM", "sandwich norms, GeGLU, logit and attention soft-capping, local/global layers",
         routed="sandwich norms (GemmaRMSNorm)"),
    _new("Gemma3ForCausalLM", "sandwich norms, q/k norms, GeGLU, local (sliding) / global layers",
         routed="q/k norms and sandwich norms"),
)}

STEERABLE_ARCHITECTURES: dict[str, str] = {a.name: a.steerable_name for a in ARCHITECTURES.values()}


def unsupported(name: str) -> str:
    """Why a model of architecture `name` cannot be steered at all."""
    return (f"the served model ({name}) has no steering support; supported architectures: "
            f"{', '.join(a.name for a in ARCHITECTURES.values())}")


def architecture(name: str) -> Architecture | None:
    """The entry of a base or steerable architecture name (None: served without steering)."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    return next((a for a in ARCHITECTURES.values() if a.steerable_name == name), None)


def refusals(name: str, text_config: dict) -> dict[str, str]:
    """steer -> reason for a checkpoint of architecture `name` with this (text) config: the
    architecture's refusals plus what the checkpoint's attention does that context attention's
    second pass does not (sliding windows, soft-capped attention logits)."""
    arch = architecture(name)
    if arch is None:
        return {}
    out = dict(arch.refused)
    uses_window = text_config.get("use_sliding_window")
    if uses_window or (text_config.get("sliding_window") and uses_window is None):
        out.setdefault("context_attention", "the served model uses sliding-window attention")
    if text_config.get("attn_logit_softcapping"):
        out.setdefault("context_attention", "the served model soft-caps its attention logits")
    return out


# the support matrix (docs/architectures.md): what tests/engine/test_architectures.py checks per row.
# Columns: (header, steer name) for the steers an architecture may refuse per request (`refused`),
# then (header, what the server loads) for its start-up refusals (`cannot_load`).
_STEER_COLUMNS = (("InfoSteer", "infosteer"), ("steering vectors", "vectors"),
                  ("context attention", "context_attention"))
_LOAD_COLUMNS = (("TAIA, full variants", FULL_VARIANTS), ("proxy tuning", PROXY_PAIRS))
# what `refusals` adds per checkpoint, for the matrix
_CHECKPOINT_CAVEATS = {"context_attention": "unless the checkpoint uses sliding-window or soft-capped attention"}
_TESTED = {"LlamaForCausalLM": "tests/engine/test_engine_llama.py and every other engine module",
           "Qwen2ForCausalLM": "tests/engine/test_engine_qwen2.py"}


# architectures on which vLLM's multi-LoRA serves a LoRA variant and its TAIA export per request,
# equal to the merged adapters on Hugging Face (tests/engine/test_architectures.py,
# test_lora_architectures.py (Qwen2) and tests/mixing/test_family_e2e.py (Llama))
LORA_TESTED = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                         "Phi3ForCausalLM", "GraniteForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"})


def markdown_matrix() -> str:
    """The support matrix as a Markdown table, from `ARCHITECTURES`."""
    headers = [h for h, _ in _STEER_COLUMNS + _LOAD_COLUMNS] + ["TAIA, LoRA variants"]
    lines = ["| architecture | " + " | ".join(headers) + " | differs from Llama | tested in |",
             "|---" * (len(headers) + 3) + "|"]
    for a in ARCHITECTURES.values():
        cells = []
        for _, steer in _STEER_COLUMNS:
            caveat = _CHECKPOINT_CAVEATS.get(steer)
            if steer in a.refused:
                cells.append(f"refused: {a.refused[steer]}")
            else:
                cells.append(f"yes, {caveat}" if caveat else "yes")
        cells += [f"refused: {a.cannot_load[what]}" if what in a.cannot_load else "yes" for _, what in _LOAD_COLUMNS]
        cells.append("yes (vLLM's multi-LoRA)" if a.name in LORA_TESTED
                     else "vLLM's multi-LoRA; not tested on this architecture")
        tested = _TESTED.get(a.name, "tests/engine/test_architectures.py")
        lines.append(f"| {a.name} | " + " | ".join(cells) + f" | {a.note} | {tested} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_matrix())
