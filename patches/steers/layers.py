"""Layer lists shared by the steers that take `layers`."""

from __future__ import annotations

from .base import ModelInfo, SteerError

MAX_LAYER_LIST = 1024  # cap on the length of a layer list, duplicates included


def resolve_layers(layers: str | list[int], info: ModelInfo, field: str) -> tuple[int, ...]:
    """`"all"` or a list of layer indices -> sorted unique indices, each checked against the model."""
    if layers == "all":
        return tuple(range(info.num_layers))
    for i, layer in enumerate(layers):
        if not 0 <= layer < info.num_layers:
            raise SteerError(f"{field}[{i}]", f"layer {layer} out of range; allowed 0..{info.num_layers - 1} for "
                                              "this model")
    return tuple(sorted(set(layers)))
