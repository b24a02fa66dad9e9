"""Proxy tuning's expert / anti-expert sub-models inside the one registered vLLM model (see
`patches/steers/proxy/engine.py`).

Surfaces: vLLM's Llama/Qwen2 `ForCausalLM` classes built a second time with another HF config
(`VllmConfig` / `ModelConfig` shallow copies with `hf_config` and `model` replaced, under
`set_current_vllm_config`; in an eager engine a `CompilationConfig` copy with mode NONE and every
custom op on, sharing `static_forward_context`), their `load_weights` and `compute_logits`, the
model's inner `.model(input_ids, positions)`, the `support_torch_compile` wrapper (in a compiled
engine the sub-models compile too, under `set_model_tag`, as vLLM's draft models do; its
`do_not_compile` flag tells the eager ones), `set_forward_context` (the warm-up run), the forward
context's per-layer `attn_metadata` and `slot_mapping` dicts and its `cudagraph_runtime_mode` /
`batch_descriptor`, and `extract_layer_index` (one integer per layer name: pair names become
module names without a bare integer segment). The step's metadata, cut to the
proxy requests, comes from `metadata.py`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .metadata import build_metadata, install_metadata_recorder, subset_common_metadata
from .mixing import checkpoint_weights

logger = logging.getLogger("steerserve")

_fallback_warned: set[str] = set()  # pairs whose metadata fallback was logged


class ProxyUnavailable(RuntimeError):
    """This step cannot run the experts (the proxy requests get the base's logits)."""

PROXY_ATTR = "steer_proxy"
_PROXY_CLASSES = {"LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
                  "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM")}
PROXY_ROLES = ("expert", "anti_expert")


def proxy_module_key(name: str) -> str:
    """Module name of a pair (a ModuleDict key: no '.', never a bare integer)."""
    return "pair_" + name.replace(".", "_")


def build_proxy_models(model: torch.nn.Module, vllm_config: Any, pairs: list[dict]) -> None:
    """Build each pair's expert and anti-expert as sub-models of `model` (`model.steer_proxy`),
    with their own HF configs, registered under distinct prefixes so vLLM gives every one of their
    attention layers a KV cache. Called at the end of the model's __init__."""
    import copy
    import importlib

    from transformers import AutoConfig
    from vllm.config import CompilationMode, set_current_vllm_config

    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        # vLLM would split each expert's layers over the pipeline ranks too, while the experts run
        # as one pass beside the base's last rank: not supported (tensor parallelism is).
        raise ValueError("proxy-tuning pairs are not supported with pipeline parallelism "
                         f"(pipeline_parallel_size={vllm_config.parallel_config.pipeline_parallel_size}); "
                         "use tensor parallelism")
    install_metadata_recorder()  # idempotent: also where the plugin registered before the pairs were declared
    from vllm.compilation.backends import set_model_tag

    # the base's decoder stack compiles in these modes (vLLM's `support_torch_compile` rule); so do the pairs'
    compiled = vllm_config.compilation_config.mode not in (CompilationMode.NONE, CompilationMode.STOCK_TORCH_COMPILE)
    holders = torch.nn.ModuleDict()
    for pair in pairs:
        holder = torch.nn.Module()
        key = proxy_module_key(pair["name"])
        for role in PROXY_ROLES:
            hf_config = AutoConfig.from_pretrained(pair[role])
            arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
            if arch not in _PROXY_CLASSES:
                raise ValueError(f"proxy pair {pair['name']!r}: {role} {pair[role]} is a {arch}; supported: "
                                 f"{', '.join(_PROXY_CLASSES)}")
            module_name, cls_name = _PROXY_CLASSES[arch]
            cls = getattr(importlib.import_module(module_name), cls_name)
            sub_model_config = copy.copy(vllm_config.model_config)
            sub_model_config.hf_config = hf_config
            sub_model_config.hf_text_config = hf_config
            # the compile cache's key hashes the model config: the checkpoint's path keeps each
            # sub-model's compiled graph (whose attention calls name its own layers) its own
            sub_model_config.model = str(pair[role])
            sub_config = copy.copy(vllm_config)
            sub_config.model_config = sub_model_config
            prefix = f"{PROXY_ATTR}.{key}.{role}"
            if compiled:
                # compiled like the base, as vLLM compiles its draft models: the engine's own
                # compilation config (its static forward context holds every attention layer) and a
                # model tag of its own; the token dimension is dynamic, so the proxy rows' varying
                # count compiles once (`warm_up_pairs`, in vLLM's warm-up run)
                with set_current_vllm_config(sub_config), set_model_tag(prefix):
                    sub = cls(vllm_config=sub_config, prefix=prefix)
            else:
                # eager: give the sub-models vLLM's own kernels for norms, activations and rotary
                # embeddings (the slow native torch path is for compiled graphs). The copy shares the
                # static forward context, where their attention layers register.
                sub_compilation = copy.copy(vllm_config.compilation_config)
                sub_compilation.mode = CompilationMode.NONE
                sub_compilation.custom_ops = ["all"]
                sub_config.compilation_config = sub_compilation
                with set_current_vllm_config(sub_config):
                    sub = cls(vllm_config=sub_config, prefix=prefix)
            sub.steer_path = pair[role]
            setattr(holder, role, sub)
        holder.steer_name = pair["name"]
        holders[key] = holder
    holders.steer_submodel = True  # not the base's modules (TAIA variants skip them: `submodel_prefixes`)
    model.steer_proxy = holders
    model.steer_proxy_names = {pair["name"]: proxy_module_key(pair["name"]) for pair in pairs}


def load_proxy_weights(model: torch.nn.Module) -> set[str]:
    """Load every sub-model's checkpoint with its own `load_weights`; returns the loaded parameter
    names, prefixed as `model.named_parameters()` names them."""
    loaded: set[str] = set()
    for key, holder in getattr(model, PROXY_ATTR, {}).items():
        for role in PROXY_ROLES:
            sub = getattr(holder, role)
            names = sub.load_weights(checkpoint_weights(sub.steer_path)) or set()
            missing = sorted({n for n, _ in sub.named_parameters()} - set(names))
            if missing:
                raise ValueError(f"proxy pair {holder.steer_name!r}: {role} {sub.steer_path} lacks weights for "
                                 f"{missing[:5]}")
            loaded |= {f"{PROXY_ATTR}.{key}.{role}.{n}" for n in names}
            logger.info("steerserve: proxy pair %r: %s loaded from %s", holder.steer_name, role, sub.steer_path)
    return loaded


def _attention_layer_names(module: torch.nn.Module) -> list[str]:
    names = getattr(module, "_steer_attention_layers", None)
    if names is None:
        from vllm.model_executor.layers.attention import Attention

        names = [m.layer_name for _, m in module.named_modules() if isinstance(m, Attention)]
        module._steer_attention_layers = names
    return names


def _subset_metadata(holder: torch.nn.Module, requests: list[int],
                     step: dict[str, tuple[Any, Any]]) -> tuple[dict[str, Any], torch.Tensor] | None:
    """Per attention layer of the pair's two sub-models, this step's metadata (`step`: layer name ->
    (group, common metadata)) cut to `requests`, and the token rows kept; None when a layer's
    metadata was not recorded this step (then: every row)."""
    overrides: dict[str, Any] = {}
    built: dict[int, Any] = {}
    tokens = None
    for role in PROXY_ROLES:
        for layer in _attention_layer_names(getattr(holder, role)):
            entry = step.get(layer)
            if entry is None:
                return None
            group, cm = entry
            if id(group) not in built:
                sub_cm, tokens = subset_common_metadata(cm, requests)
                built[id(group)] = build_metadata(group, sub_cm)
            overrides[layer] = built[id(group)]
    return (overrides, tokens) if tokens is not None else None


def run_pair(model: torch.nn.Module, name: str, requests: list, input_ids: torch.Tensor,
             positions: torch.Tensor, num_tokens: int, step: dict[str, tuple[Any, Any]]):
    """After the base forward: run pair `name`'s expert and anti-expert on the token rows of
    `requests` ([(batch index, start row, end row, alpha)], sorted) with the step's attention
    metadata (`step`, layer name -> (group, common metadata)) cut to them. Returns (sub_of_row:
    [num_tokens] long, each token row's row in the experts' states or -1, expert final hidden
    states, anti-expert final hidden states)."""
    from vllm.forward_context import get_forward_context

    fc = get_forward_context()
    metadata = fc.attn_metadata
    if not isinstance(metadata, dict):
        raise ProxyUnavailable("proxy tuning does not support micro-batched steps")
    holder = getattr(model, PROXY_ATTR)[model.steer_proxy_names[name]]
    cut = _subset_metadata(holder, [r[0] for r in requests], step)
    if cut is None:
        if name not in _fallback_warned:
            _fallback_warned.add(name)
            logger.warning("steerserve: proxy pair %r: a step's attention metadata was not seen; its experts "
                           "run on every row of such steps (correct, slower; logged once)", name)
        overrides, rows = {}, torch.arange(num_tokens, dtype=torch.long)
    else:
        overrides, rows = cut
    sub_of_row = torch.full((num_tokens,), -1, dtype=torch.long)
    sub_of_row[rows] = torch.arange(rows.shape[0], dtype=torch.long)
    rows_dev = rows.to(input_ids.device)
    ids, pos = input_ids.index_select(0, rows_dev), positions.index_select(0, rows_dev)
    # the KV writes read the per-layer slot mapping of the forward context: cut it alike
    slots = fc.slot_mapping if isinstance(fc.slot_mapping, dict) else {}
    cut_slots: dict[int, torch.Tensor] = {}  # layers of one KV group share a mapping: cut each once
    slot_overrides = {}
    for layer in overrides:
        mapping = slots.get(layer)
        if mapping is not None:
            if id(mapping) not in cut_slots:
                cut_slots[id(mapping)] = mapping.index_select(0, rows.to(mapping.device))
            slot_overrides[layer] = cut_slots[id(mapping)]
    saved = {layer: metadata.get(layer) for layer in overrides}
    saved_slots = {layer: slots[layer] for layer in slot_overrides}
    metadata.update(overrides)
    slots.update(slot_overrides)
    # compiled sub-models never replay a CUDA graph: one captured for the step's batch would not
    # fit their rows (steerserve runs without graphs; this holds for an engine started with them)
    graph_mode, descriptor = fc.cudagraph_runtime_mode, fc.batch_descriptor
    fc.cudagraph_runtime_mode, fc.batch_descriptor = type(graph_mode).NONE, None
    try:
        h = {role: getattr(holder, role).model(ids, pos, None) for role in PROXY_ROLES}
    finally:
        metadata.update(saved)
        slots.update(saved_slots)
        fc.cudagraph_runtime_mode, fc.batch_descriptor = graph_mode, descriptor
    return sub_of_row, h["expert"], h["anti_expert"]


def warm_up_pairs(model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> list[str]:
    """Compile every compiled sub-model now, in vLLM's warm-up (after a dummy run, on its token ids
    and positions: the runner's own buffers, whose dtypes the compiled graph keeps; no attention
    metadata, so attention writes nothing), so that the first proxy request does not wait for the
    compiler. Returns the prefixes run (none: an eager engine, or done already)."""
    from vllm.forward_context import set_forward_context

    done = []
    for key, holder in getattr(model, PROXY_ATTR, {}).items():
        for role in PROXY_ROLES:
            inner = getattr(holder, role).model
            if getattr(inner, "do_not_compile", True) or getattr(holder, f"steer_warm_{role}", False):
                continue
            with set_forward_context(None, inner.vllm_config, num_tokens=input_ids.shape[0]):
                inner(input_ids, positions, None)
            setattr(holder, f"steer_warm_{role}", True)
            done.append(f"{PROXY_ATTR}.{key}.{role}")
    return done


def pair_logits(model: torch.nn.Module, name: str, role: str, hidden: torch.Tensor) -> torch.Tensor:
    """The pair's expert's or anti-expert's logits for its final hidden states `hidden`."""
    holder = getattr(model, PROXY_ATTR)[model.steer_proxy_names[name]]
    return getattr(holder, role).compute_logits(hidden)


def loaded_pairs(model: torch.nn.Module) -> set[str]:
    return set(getattr(model, "steer_proxy_names", {}))
