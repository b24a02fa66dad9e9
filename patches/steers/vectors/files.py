"""Steering-vector files: reading, checking and writing the two formats the server loads.

- **GGUF control vectors** (llama.cpp's `--control-vector`, repeng's `ControlVector.export_gguf`):
  one 1-D tensor `direction.<i>` per layer, `i` the 0-based decoder layer after whose output the
  vector is added (llama.cpp adds `direction.i` to block i's output `l_out`; repeng to the output
  of `model.layers[i]`). Metadata `controlvector.model_hint` (the model type) when present.
  Read with the `gguf` package.
- **safetensors** (written by `steerserve train vectors`): tensors `direction.<i>` as above and
  string metadata `steerserve.format` = "vectors", `base_model`, `hidden_size`, `num_layers`,
  `method`, `model_type`.

Both read to float32 numpy arrays; `check` refuses, naming the file and the field, a hidden size
or layer index the served model does not have, NaN/inf and empty files. Torch-free (numpy, gguf,
safetensors' numpy API): the CLI, the API server and the engine's workers read the same files.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMATS = ("gguf", "safetensors")
_DIRECTION = re.compile(r"^direction\.(\d+)$")
SAFETENSORS_MARK = "vectors"  # metadata `steerserve.format`


class VectorFileError(ValueError):
    """A vector file the server cannot load (the message names the file and the field)."""


@dataclass(frozen=True)
class VectorInfo:
    """What the server lists and validates requests against (`GET /v1/steer/vectors`)."""

    name: str
    path: str
    format: str
    hidden_size: int
    layers: tuple[int, ...]
    norms: tuple[float, ...]  # L2 norm of the direction of each layer in `layers`
    model: str | None = None  # the model hint / base model the file names
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**asdict(self), "layers": list(self.layers), "norms": list(self.norms)}

    @classmethod
    def from_json(cls, body: dict) -> VectorInfo:
        return cls(**{**body, "layers": tuple(body["layers"]), "norms": tuple(body["norms"])})

    def listing(self) -> dict:
        """The public entry of `GET /v1/steer/vectors` (no server paths)."""
        return {"name": self.name, "format": self.format, "hidden_size": self.hidden_size,
                "layers": list(self.layers), "norms": {str(i): round(n, 6) for i, n in zip(self.layers, self.norms)},
                "model": self.model, "metadata": self.metadata}


def detect_format(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 8:
        size = int.from_bytes(head, "little")
        with open(path, "rb") as f:
            f.seek(8)
            if f.read(1) == b"{" and 0 < size < (1 << 26):
                return "safetensors"
    raise VectorFileError(f"{path}: unknown vector file format (expected a GGUF control vector or a safetensors "
                          "file with direction.<layer> tensors)")


def read_directions(path: str | Path) -> tuple[str, dict[int, np.ndarray], dict]:
    """(format, {layer: float32 direction}, metadata) of a vector file. Raises VectorFileError."""
    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"{path}: no such vector file")
    fmt = detect_format(path)
    raw: dict[str, np.ndarray] = {}
    meta: dict = {}
    try:
        if fmt == "gguf":
            import gguf

            reader = gguf.GGUFReader(str(path))
            for t in reader.tensors:
                raw[t.name] = np.asarray(t.data)
            hint = reader.get_field("controlvector.model_hint")
            if hint is not None and len(hint.parts):
                meta["model"] = bytes(hint.parts[-1]).decode("utf-8", errors="replace")
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = dict(f.metadata() or {})
                for key in f.keys():
                    raw[key] = f.get_tensor(key)
    except VectorFileError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt file: name it and the reader's reason
        raise VectorFileError(f"{path}: cannot read the {fmt} file ({type(err).__name__}: {err})") from None
    directions: dict[int, np.ndarray] = {}
    for key, value in raw.items():
        m = _DIRECTION.match(key)
        if not m:
            raise VectorFileError(f"{path}: tensor {key!r}: expected tensors named direction.<layer>")
        arr = np.asarray(value)
        if arr.ndim != 1:
            raise VectorFileError(f"{path}: tensor {key!r}: shape {list(arr.shape)}; a direction is 1-D")
        if not np.issubdtype(arr.dtype, np.floating):
            raise VectorFileError(f"{path}: tensor {key!r}: dtype {arr.dtype}; a direction is floating point")
        directions[int(m.group(1))] = arr.astype(np.float32)
    if not directions:
        raise VectorFileError(f"{path}: no direction.<layer> tensors")
    if fmt == "safetensors" and meta.get("steerserve.format") not in (None, SAFETENSORS_MARK):
        raise VectorFileError(f"{path}: metadata steerserve.format is {meta.get('steerserve.format')!r}, "
                              f"expected {SAFETENSORS_MARK!r}")
    return fmt, dict(sorted(directions.items())), meta


def check(name: str, path: str | Path, hidden_size: int | None, num_layers: int | None) -> VectorInfo:
    """Read and check a vector file against the served model's hidden size and layer count
    (None: unchecked). Raises VectorFileError naming the file and the field."""
    fmt, directions, meta = read_directions(path)
    sizes = {d.shape[0] for d in directions.values()}
    if len(sizes) != 1:
        raise VectorFileError(f"{path}: direction tensors of different lengths {sorted(sizes)}")
    size = sizes.pop()
    if hidden_size and size != hidden_size:
        raise VectorFileError(f"{path}: hidden size {size} (length of direction.{next(iter(directions))}) does not "
                              f"match the served model's hidden size {hidden_size}")
    if num_layers is not None:
        bad = [i for i in directions if i >= num_layers]
        if bad:
            raise VectorFileError(f"{path}: direction.{bad[0]}: layer {bad[0]} out of range; the served model has "
                                  f"{num_layers} layers (0..{num_layers - 1})")
    if fmt == "safetensors" and meta.get("num_layers") and num_layers is not None \
            and str(meta["num_layers"]) != str(num_layers):
        raise VectorFileError(f"{path}: metadata num_layers is {meta['num_layers']}, the served model has "
                              f"{num_layers} layers")
    for i, d in directions.items():
        if not np.isfinite(d).all():
            raise VectorFileError(f"{path}: direction.{i} holds NaN or infinite values")
    norms = tuple(float(np.linalg.norm(d.astype(np.float64))) for d in directions.values())
    model = meta.pop("model", None) or meta.get("base_model") or meta.get("model_type")
    meta.pop("steerserve.format", None)
    return VectorInfo(name, str(Path(path).resolve()), fmt, size, tuple(directions), norms, model,
                      {k: v for k, v in meta.items() if k in ("base_model", "base_digest", "method", "model_type", "source", "pairs")})


def write_safetensors(path: str | Path, directions: dict[int, np.ndarray], metadata: dict) -> None:
    """Write `directions` (layer -> 1-D array) with string metadata (`steerserve.format` added)."""
    from safetensors.numpy import save_file

    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["steerserve.format"] = SAFETENSORS_MARK
    save_file({f"direction.{i}": np.ascontiguousarray(d, dtype=np.float32) for i, d in sorted(directions.items())},
              str(path), metadata=meta)


def write_gguf(path: str | Path, directions: dict[int, np.ndarray], model_hint: str) -> None:
    """Write a llama.cpp / repeng control-vector GGUF (as `repeng.ControlVector.export_gguf` does)."""
    import gguf

    arch = "controlvector"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_hint)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for i, d in sorted(directions.items()):
        writer.add_tensor(f"direction.{i}", np.ascontiguousarray(d, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def parse_cli_value(value: str) -> tuple[str, str]:
    """`NAME=FILE` -> (name, file)."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise VectorFileError(f"--vector {value!r}: expected NAME=FILE")
    return name.strip(), path.strip()
