"""The layer hook points (worker process): steerable MLPs (the FFN coefficients) and steerable
decoder layers (the residual stream after each layer).

Surfaces: vLLM's Llama/Qwen2 gated MLP layout (`gate_up_proj`, `act_fn`, `down_proj`; under tensor
parallelism `MergedColumnParallelLinear` gate/up and `RowParallelLinear` down), the decoder layer's
attributes (`input_layernorm`, `post_attention_layernorm`, `self_attn`, `mlp`) and its output: a
split residual stream `(hidden_states, residual)` that the next layer's fused add-norm (or the
final norm) adds, or the whole stream as one tensor; and `extract_layer_index`.
"""

from __future__ import annotations

import torch

from ..steers.engine import StepHandle, ffn_steer, residual_steer
from .parallel import gather_last_dim, tensor_parallel


def mlp_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, MLP module) for every vLLM gated MLP in `model`."""
    from vllm.model_executor.models.utils import extract_layer_index

    found = []
    for name, module in model.named_modules():
        if name.endswith(".mlp") and all(hasattr(module, a) for a in ("gate_up_proj", "act_fn", "down_proj")):
            found.append((extract_layer_index(name), module))
    return found


class _SteerableMLPMixin:
    """forward = down_proj(hook(act(gate_up_proj(x)))); the hook is a no-op outside steered steps."""

    steer_layer: int
    steer_handle: StepHandle

    def forward(self, x):
        gate_up, _ = self.gate_up_proj(x)
        coeffs = self.act_fn(gate_up)  # [num_tokens, d_ffn / tp]: the FFN memory coefficients
        ffn_steer(coeffs, self.steer_handle.index, self.steer_layer)
        out, _ = self.down_proj(coeffs)
        return out


_steerable_classes: dict[type, type] = {}


def make_mlps_steerable(model: torch.nn.Module, handle: StepHandle) -> int:
    """Swap every gated MLP of `model` for a steerable subclass of its own class, in place
    (parameters untouched, called before weights load), calling `handle`'s FFN hook. Returns the
    number of MLPs swapped. Under tensor parallelism each MLP holds a column slice of the FFN: the
    handle gets the all-gather its engines need for whole-row statistics (`handle.shards`)."""
    rank, world = tensor_parallel()
    if world > 1:
        handle.shards = (gather_last_dim(), rank)
    return _make_steerable(mlp_modules(model), _SteerableMLPMixin, handle)


def _make_steerable(modules: list[tuple[int, torch.nn.Module]], mixin: type, handle: StepHandle) -> int:
    """Swap each module's class for `mixin` over its own class (one subclass per class, cached),
    in place, and give it its layer index and the handle. Returns the number swapped."""
    for layer, module in modules:
        cls = type(module)
        if cls not in _steerable_classes:
            _steerable_classes[cls] = type(f"Steerable{cls.__name__}", (mixin, cls), {})
        module.__class__ = _steerable_classes[cls]
        module.steer_layer = layer
        module.steer_handle = handle
    return len(modules)


def decoder_layers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, decoder layer) for every vLLM Llama/Qwen2-style decoder layer in `model` (on
    this pipeline stage: the others are `PPMissingLayer`s)."""
    from vllm.model_executor.models.utils import extract_layer_index

    found = []
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")):
            found.append((extract_layer_index(name), module))
    return found


class _SteerableDecoderLayerMixin:
    """forward = the layer's own, then the residual hook on its output (a no-op outside steered
    steps). A split stream (hidden_states, residual), whose sum the next layer's fused add-norm
    forms: the hook adds to the `hidden_states` half once, so the sum carries it. A whole stream
    (one tensor, e.g. Granite): the hook adds to it."""

    steer_layer: int
    steer_handle: StepHandle

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        residual_steer(out[0] if isinstance(out, tuple) else out, self.steer_handle.index, self.steer_layer)
        return out


def make_decoder_layers_steerable(model: torch.nn.Module, handle: StepHandle) -> int:
    """Swap every decoder layer of `model` for a steerable subclass of its own class, in place
    (as `make_mlps_steerable`), calling `handle`'s residual hook. Returns the number swapped."""
    return _make_steerable(decoder_layers(model), _SteerableDecoderLayerMixin, handle)
