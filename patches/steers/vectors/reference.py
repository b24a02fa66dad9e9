"""The steering vectors' pure-torch reference over Hugging Face models, as repeng's `ControlModel`
does it: a forward hook on each steered `model.layers[i]` adds the vector to the layer's output
(the residual stream after layer i). Unlike repeng (one configuration for the whole batch) row r
gets its own plan. Used by the parity tests and the benchmarks' baseline.

The served vectors are not in a plan (it names them): `attach(model, {name: file})` loads them
onto the model first.
"""

from __future__ import annotations

import contextlib

import torch

from . import VectorsPlan
from .files import read_directions


def attach(model: torch.nn.Module, files: dict) -> None:
    """Load vector files ({name: path}) onto `model` for `hooks`."""
    vectors = getattr(model, "steer_vectors", {})
    for name, path in files.items():
        _, directions, _ = read_directions(path)
        vectors[name] = {i: torch.from_numpy(d) for i, d in directions.items()}
    model.steer_vectors = vectors


def _layers(model: torch.nn.Module):
    return getattr(model, "model", model).layers


def _adds(model, plans: list, phase: str, num_layers: int, hidden: int) -> torch.Tensor:
    """[rows, layers, hidden]: per row the float32 sum of its terms at `phase` positions."""
    out = torch.zeros(len(plans), num_layers, hidden, dtype=torch.float32)
    for r, plan in enumerate(plans):
        for term in plan.terms if plan is not None else ():
            if term.positions in ("all", phase):
                for layer in term.layers:
                    out[r, layer] += term.scale * model.steer_vectors[term.name][layer]
    return out


@contextlib.contextmanager
def hooks(model: torch.nn.Module, plans: list, pads: list[int], total_len: int,
          prompt_width: int | None = None):
    """Row r (left-padded by `pads[r]`) steered by `plans[r]` (a VectorsPlan or None). Columns
    below `prompt_width` are prompt tokens (None: every token is), the others generated ones; the
    model's forward calls are taken as one growing sequence (Hugging Face `generate` with a cache)."""
    layers = _layers(model)
    dtype = next(model.parameters()).dtype
    hidden = model.config.hidden_size
    prompt = _adds(model, plans, "prompt", len(layers), hidden).to(dtype)
    generated = _adds(model, plans, "generated", len(layers), hidden).to(dtype)
    steered_layers = sorted({i for p in plans if isinstance(p, VectorsPlan) for t in p.terms for i in t.layers})
    seen = {"offset": 0, "width": 0}
    pads_t = torch.tensor(pads)
    handles = []

    def pre_hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        width = (ids if ids is not None else emb).shape[1]
        seen["offset"] += seen["width"]
        seen["width"] = width

    def layer_hook(layer: int):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            cols = torch.arange(seen["offset"], seen["offset"] + out.shape[1])
            is_prompt = (cols < prompt_width) if prompt_width is not None else torch.ones_like(cols, dtype=torch.bool)
            add = torch.where(is_prompt[None, :, None], prompt[:, layer][:, None, :], generated[:, layer][:, None, :])
            real = (cols[None, :] >= pads_t[:, None]).to(dtype)[..., None]  # no vector on left padding
            out = out + (add.to(out.device) * real.to(out.device))
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return hook

    if steered_layers:
        handles.append(getattr(model, "model", model).register_forward_pre_hook(pre_hook, with_kwargs=True))
        for i in steered_layers:
            handles.append(layers[i].register_forward_hook(layer_hook(i)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
