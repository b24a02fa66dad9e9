"""TAIA mixing of fully fine-tuned variants: which modules are routed, loading the variants'
weights, the shadows that compute with them, the LM head (see `patches/steers/mixing/engine.py`).

Surfaces: vLLM's Llama/Qwen2 module names (`embed_tokens`, `layers.N.input_layernorm`,
`post_attention_layernorm`, `self_attn.qkv_proj`/`o_proj`, `mlp.gate_up_proj`/`down_proj`,
`model.norm`, `lm_head`, `logits_processor`), the layer classes (`LinearBase`, `RMSNorm`,
`VocabParallelEmbedding`, `ParallelLMHead`), the models' `load_weights` (called a second time per
variant with the parameters' storage swapped, so vLLM's own stacking and sharding load them), the
layers' `quant_method.process_weights_after_loading` (run on each shadow, so a shadow computes
with the same kernels as its module), and the forward signatures of linear layers (returning
(out, bias) or out), RMSNorm (x, residual) and embeddings (ids), which the engine's routing mixins
wrap.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("steerserve")


_SITE_RE = (
    (r"(^|\.)embed_tokens$", "attention"),
    (r"(^|\.)layers\.\d+\.(input_layernorm|post_attention_layernorm)$", "attention"),
    (r"(^|\.)layers\.\d+\.self_attn\.(qkv_proj|o_proj)$", "attention"),
    (r"(^|\.)layers\.\d+\.mlp\.(gate_up_proj|down_proj)$", "ffn"),
    (r"^model\.norm$", "attention"),
)


def mixing_sites(model: torch.nn.Module, skip: tuple[str, ...]) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, module, component) for every module TAIA mixing routes, plus the LM head when it is
    a module of its own (untied): it is routed in `compute_logits`, not by a forward. Modules under
    the prefixes `skip` (`submodel_prefixes`) are not the base's and are left alone."""
    import re

    found = []
    for name, module in model.named_modules():
        if name.startswith(skip):
            continue
        for pattern, component in _SITE_RE:
            if re.search(pattern, name):
                found.append((name, module, component))
                break
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and all(lm_head is not m for _, m, _ in found) and hasattr(lm_head, "weight"):
        found.append(("lm_head", lm_head, "attention"))
    return found


def submodel_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """Name prefixes of the sub-models an engine built inside `model` (modules marked
    `steer_submodel`, e.g. proxy pairs): their modules and parameters are not the base model's."""
    return tuple(f"{name}." for name, m in model.named_modules() if getattr(m, "steer_submodel", False))


_mixable_classes: dict[type, type] = {}


def _mixable_class(module: torch.nn.Module, mixins: dict[str, type]) -> type | None:
    """`module`'s class with the routing mixin of its kind ("linear", "norm", "embedding") in front;
    None for the LM head (routed in `compute_logits`)."""
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    cls = type(module)
    if cls in _mixable_classes:
        return _mixable_classes[cls]
    if isinstance(module, ParallelLMHead):
        return None  # routed in compute_logits
    if isinstance(module, LinearBase):
        mixin = mixins["linear"]
    elif isinstance(module, RMSNorm):
        mixin = mixins["norm"]
    elif isinstance(module, VocabParallelEmbedding):
        mixin = mixins["embedding"]
    else:
        raise TypeError(f"steerserve: cannot route rows through {cls.__name__}")
    _mixable_classes[cls] = type(f"Mixable{cls.__name__}", (mixin, cls), {})
    return _mixable_classes[cls]


def checkpoint_weights(folder: str | Path):
    """(name, tensor) of every tensor in a checkpoint folder's safetensors files, one at a time."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for key in fh.keys():
                yield key, fh.get_tensor(key)


def load_variant_weights(model: torch.nn.Module, load_weights, variants: list[dict],
                         mixins: dict[str, type]) -> list[torch.nn.Module]:
    """After the base weights are loaded (before vLLM processes them), load each fully fine-tuned
    variant through the model's own `load_weights` (parameters' storage swapped to fresh tensors,
    then restored) and keep, per site, the variant's tensors that differ from the base's. Swaps the
    routed sites' classes to routing ones (`mixins` by kind) and returns those sites.
    `load_weights` is the base class's bound method."""

    skip = submodel_prefixes(model)  # a proxy pair's sub-models: their own checkpoints, not routed
    sites = mixing_sites(model, skip)
    params = {name: p for name, p in model.named_parameters() if not name.startswith(skip)}
    name_of = {id(p): name for name, p in params.items()}
    base = {name: p.data for name, p in params.items()}
    for _, module, component in sites:
        module.steer_component = component
        module.steer_variants = {}
        module.steer_shadows = {}
    for index, variant in enumerate(variants):
        folder = variant["path"]
        for p in params.values():
            p.data = torch.empty_like(p.data)
        try:
            loaded = load_weights(checkpoint_weights(folder))
        finally:
            fresh = {name: p.data for name, p in params.items()}
            for name, p in params.items():
                p.data = base[name]
        missing = sorted(set(params) - set(loaded or ()))
        if missing:
            raise ValueError(f"variant {variant['name']!r} ({folder}) lacks weights for {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        differing = 0
        for _, module, _ in sites:
            # by parameter identity: a tied LM head's weight is the embedding's parameter
            own = {pname: name_of[id(p)] for pname, p in module.named_parameters(recurse=False) if id(p) in name_of}
            tensors = {pname: fresh[full] for pname, full in own.items()}
            if any(not torch.equal(t, base[own[pname]]) for pname, t in tensors.items()):
                module.steer_variants[index] = tensors
                differing += 1
        logger.info("steerserve: variant %d %r: %d of %d routed modules differ from the base",
                    index, variant["name"], differing, len(sites))
    routed = []
    for _, module, _ in sites:
        module.steer_routed = bool(module.steer_variants)
        module.steer_base_class = type(module)
        for index in list(module.steer_variants):
            shadow_for(module, index)  # built now: errors surface at start-up, not in a request
        if module.steer_routed:
            cls = _mixable_class(module, mixins)
            if cls is not None:
                module.__class__ = cls
            routed.append(module)
    return routed


def shadow_for(module: torch.nn.Module, variant: int) -> torch.nn.Module | None:
    """The module's copy holding `variant`'s weights, processed by the module's own quant method
    (built once, when the variants load); None when the variant's weights equal the base's here."""
    if variant in module.steer_shadows:
        return module.steer_shadows[variant]
    tensors = module.steer_variants.get(variant)
    shadow = None
    if tensors is not None:
        import copy
        import types

        shadow = copy.copy(module)
        shadow.__class__ = module.steer_base_class
        shadow._parameters = dict(module._parameters)
        for attr, value in list(vars(shadow).items()):
            # methods bound to the module (a CustomOp's dispatched `_forward_method`) rebound to the shadow
            if isinstance(value, types.MethodType) and value.__self__ is module:
                setattr(shadow, attr, types.MethodType(value.__func__, shadow))
        for pname, t in tensors.items():
            old = module._parameters[pname]
            new = torch.nn.Parameter(t, requires_grad=False)
            for attr, value in vars(old).items():  # weight_loader, output_dim, ...
                setattr(new, attr, value)
            shadow._parameters[pname] = new
        method = getattr(shadow, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(shadow)
        # Keep the loaded tensors alive with the shadow: the CPU oneDNN GEMM handle made while
        # processing reads the original weight memory (measured: freeing it corrupts decode steps).
        shadow.steer_weights = tensors
        del module.steer_variants[variant]
    module.steer_shadows[variant] = shadow
    return shadow


def lm_head_module(model: torch.nn.Module) -> torch.nn.Module:
    return model.lm_head


def segmented_logits(model: torch.nn.Module, hidden_states: torch.Tensor, route: Any) -> torch.Tensor | None:
    """The logits of `hidden_states` with each row computed once, by its own LM head: the variant's
    for the rows of requests whose attention component (which holds the LM head) is tuned, the
    base's for the rest (`route`: the step's `LogitsRoute`). None (compute as usual: the base LM
    head on every row) when the head is not routed, no row is routed to a variant with a head of its
    own, or the rows match neither the step's requests nor its hidden states (logged)."""
    head = lm_head_module(model)
    if route is None or not getattr(head, "steer_routed", False):
        return None
    rows = route.rows_for(hidden_states)
    if rows is None:
        logger.error("steerserve: compute_logits got %d rows that match neither the step's requests nor its "
                     "hidden states; mixed requests' logits use the base LM head", hidden_states.shape[0])
        return None
    if not rows:
        return None
    groups = [(shadow_for(head, variant), idx) for variant, idx in rows.items() if idx.numel()]
    groups = [(shadow, idx) for shadow, idx in groups if shadow is not None]
    if not groups:
        return None
    n = hidden_states.shape[0]
    base = torch.ones(n, dtype=torch.bool, device=hidden_states.device)
    for _, idx in groups:
        base[idx] = False
    if bool(base.any()):
        groups.insert(0, (head, base.nonzero().squeeze(1)))
    if len(groups) == 1 and groups[0][1].numel() == n:
        return model.logits_processor(groups[0][0], hidden_states)  # one head owns every row
    out = None
    for module, idx in groups:
        part = model.logits_processor(module, hidden_states.index_select(0, idx))
        if part is None:  # a tensor-parallel rank without the gathered logits
            return None
        if out is None:
            out = part.new_empty((n, *part.shape[1:]))
        out.index_copy_(0, idx, part)
    return out
