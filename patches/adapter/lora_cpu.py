"""A fix for vLLM 0.32's CPU multi-LoRA: rows without an adapter got the last slot's adapter.

vLLM marks a token that uses no LoRA adapter with index -1. Its GPU kernels skip such rows; the
pure-torch ops the CPU build runs (`vllm.lora.ops.torch_ops`: `bgmv_shrink`, `bgmv_expand`,
`bgmv_expand_slice`, and the `sgmv_*` ones that call them) index the stacked adapter weights with
it, and Python's -1 is the last slot: once an adapter is loaded into the last of `--max-loras`
slots, every request without an adapter in a step that runs LoRA is computed with that adapter's
delta (measured on a tiny Llama: plain rows off by 4-6 nats per token beside a TAIA adapter, exact
when the last slot was empty; the stock model class fails the same way). steerserve serves TAIA
LoRA variants as three adapters of one family (tuned, TAIA, FFN-only) with `--max-loras` slots
for them, so plain requests would be served with one of them.

`install_cpu_lora_fix` wraps the three `bgmv_*` ops (in `lora_ops`, where the `sgmv_*` ones find
them, in the `torch_ops` package and in `punica_cpu`, which imported them by name) so rows with a
negative index keep their output rows unchanged, as the GPU kernels do. Idempotent; the CUDA build
does not run these ops. `tests/engine/test_vllm_adapter.py` checks that the stock ops still have
the bug (an upgrade that fixes it shows there) and that the wrapped ones do not.
"""

from __future__ import annotations

import functools

from . import WRAPPED_MARK

OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")


def skip_unmapped_rows(op):
    """`op(inputs, weights, output, indices, ...)` with the rows whose index is negative left as they were."""
    if getattr(op, WRAPPED_MARK, False):
        return op

    @functools.wraps(op)
    def guarded(inputs, weights, output, indices, *args, **kwargs):
        unmapped = indices < 0
        if indices.shape[0] != output.shape[0] or not bool(unmapped.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        kept = output[unmapped].clone()
        result = op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[unmapped] = kept
        return result

    setattr(guarded, WRAPPED_MARK, True)
    guarded.stock = op
    return guarded


def install_cpu_lora_fix() -> None:
    import importlib

    try:
        modules = [importlib.import_module(name) for name in MODULES]
    except Exception:  # noqa: BLE001 - a build without the CPU LoRA path has nothing to fix
        return
    for name in OPS:
        fixed = skip_unmapped_rows(getattr(modules[0], name))
        for module in modules:
            setattr(module, name, fixed)
