"""Named head sets for context-attention steering: which (layer, head) pairs a request steers.

A head set file is JSON written by `steerserve heads profile` (or by hand):

    {"name": "smollm2-context", "heads": [[12, 3], [14, 0], ...],
     "model": {"architecture": "LlamaForCausalLM", "num_layers": 30, "num_heads": 9},
     "profile": {...how it was measured: data, metric, alpha, per-head scores...}}

Only `heads` is required. The server loads head sets from `steerserve serve --head-set [NAME=]FILE`
(repeatable) and from the config file's `head_sets` mapping (name -> file path relative to the
config file, or an inline [[layer, head], ...] list); each is checked against the served model
before vLLM starts. A head set named "default" is what requests get when they give no `heads`.
"""

from __future__ import annotations

import json
from pathlib import Path

from steerserve.patches.steers.context_attention import check_head_pairs

from .schema import ModelInfo, SteerError

HEAD_SETS_ENV = "STEERSERVE_HEAD_SETS"  # JSON {name: path}, set by `steerserve serve --head-set`
# the embedded model's profiled head set (see docs/steering.md, "Context attention"), loaded as "default"
EMBEDDED_DEFAULT = Path(__file__).parent / "data" / "smollm2-135m-instruct.heads.json"


class HeadSetError(ValueError):
    pass


def read_head_set(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise HeadSetError(f"{path}: no such head set file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HeadSetError(f"{path}: cannot parse: {err}") from None
    if isinstance(data, list):
        data = {"heads": data}
    if not isinstance(data, dict) or "heads" not in data:
        raise HeadSetError(f'{path}: a head set file is a JSON object with a "heads" list of [layer, head] pairs')
    return data


def check(name: str, pairs: object, info: ModelInfo | None, where: str) -> tuple[tuple[int, int], ...]:
    """Validate a head set's pairs (against `info` when given)."""
    if not isinstance(name, str) or not name or len(name) > 128:
        raise HeadSetError(f"{where}: head set name {name!r} must be a non-empty string of at most 128 characters")
    if info is None:
        if not isinstance(pairs, list):
            raise HeadSetError(f"{where}: head set {name!r}: heads must be a list of [layer, head] pairs")
        return tuple(sorted({tuple(p) for p in pairs}))
    try:
        pairs = check_head_pairs(pairs, info, "heads")
    except SteerError as err:
        raise HeadSetError(f"{where}: head set {name!r}: {err.field}: {err.message}") from None
    if not pairs:
        raise HeadSetError(f"{where}: head set {name!r} is empty")
    return pairs


def parse_cli_value(value: str) -> tuple[str, Path]:
    """`NAME=FILE` or `FILE` (name from the file's "name", else the file stem)."""
    if "=" in value and not Path(value).exists():
        name, _, path = value.partition("=")
        return name, Path(path)
    path = Path(value)
    data = read_head_set(path)
    return str(data.get("name") or path.stem), path


def load_files(mapping: dict[str, str | Path], info: ModelInfo | None) -> dict[str, tuple]:
    out = {}
    for name, path in mapping.items():
        out[name] = check(name, read_head_set(path)["heads"], info, str(path))
    return out


def save_head_set(path: str | Path, name: str, heads: list[tuple[int, int]], model: dict, profile: dict) -> None:
    Path(path).write_text(json.dumps(
        {"name": name, "heads": [list(p) for p in heads], "model": model, "profile": profile}, indent=1) + "\n")
