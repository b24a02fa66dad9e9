"""`steerserve train export-taia`: TAIA exports (arXiv 2405.20192, "train all parameters, infer with
attention only").

Parameters split into two components (TAIA's split, following its code pixas/TAIA_LLM):
- `ffn`: every parameter of a decoder layer's MLP (`...layers.N.mlp.*`: gate, up, down projections);
- `attention`: everything else: q/k/v/o projections, the norms, the embeddings and the LM head.

Exports:
- from a LoRA adapter: an adapter holding only the chosen component's deltas (for TAIA, the
  attention ones). The base's other component is then untouched, which is exactly TAIA; vLLM's
  multi-LoRA serves it per request next to the full adapter;
- from a fully fine-tuned checkpoint: a merged checkpoint with the tuned attention component and
  the base's FFN (needs `--base`, or the base named in the checkpoint's `steerserve.json`).

Every export carries `steerserve.json` naming its base (path and content digest) and its source.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
from pathlib import Path

from . import checkpoints as _ckpt

_FFN_RE = re.compile(r"(?:^|\.)layers\.\d+\.mlp\.")
_FFN_MODULE_NAMES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "mlp"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")
COMPONENTS = ("attention", "ffn")


def _log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


def component_of(param_name: str) -> str:
    """'ffn' for a decoder MLP parameter (also LoRA A/B of one), else 'attention'."""
    return "ffn" if _FFN_RE.search(param_name) else "attention"


def _copy_tokenizer(src: Path, out: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def split_adapter(src: str | Path, out: str | Path, keep: str = "attention") -> Path:
    """Write the LoRA adapter `src` restricted to the `keep` component's modules into `out`."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    if keep not in COMPONENTS:
        raise ValueError(keep)
    cfg = json.loads((src / "adapter_config.json").read_text())
    weights_file = src / "adapter_model.safetensors"
    if not weights_file.exists():
        raise _ckpt.CheckpointError(f"{src}: adapter_model.safetensors missing (only safetensors adapters are read)")
    tensors = load_file(weights_file)
    kept = {k: v for k, v in tensors.items() if component_of(k) == keep}
    if not kept:
        raise _ckpt.CheckpointError(f"{src}: the adapter has no {keep} modules; nothing to export")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise _ckpt.CheckpointError(f"{src}: target_modules is a regex ({targets!r}); list form required")
    is_ffn = lambda m: m.split(".")[-1] in _FFN_MODULE_NAMES  # noqa: E731
    cfg["target_modules"] = sorted(m for m in targets or [] if is_ffn(m) == (keep == "ffn"))
    saved = cfg.get("modules_to_save") or []
    cfg["modules_to_save"] = [m for m in saved if is_ffn(m) == (keep == "ffn")] or None
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            cfg[key] = {k: v for k, v in cfg[key].items() if (component_of(k) == keep)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(kept, out / "adapter_model.safetensors")
    _copy_tokenizer(src, out)
    return out


def _base_of(src: Path, base: str | Path | None) -> Path:
    if base:
        return Path(base).expanduser().resolve()
    meta = _ckpt.read_metadata(src)
    if meta is None:
        raise SystemExit(f"{src}: no steerserve.json naming its base; pass --base")
    path = Path(meta["base"]["path"])
    if not path.exists():
        raise SystemExit(f"{src}: its base {path} (from steerserve.json) does not exist; pass --base")
    return path


def merge_full(tuned: str | Path, base: str | Path, out: str | Path, attention: str = "tuned",
               ffn: str = "base") -> Path:
    """A full checkpoint whose attention component comes from `attention` ("tuned"|"base") and FFN
    from `ffn`; shards, config and tokenizer follow the tuned checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tuned, base, out = Path(tuned), Path(base), Path(out)
    for c in (attention, ffn):
        if c not in ("tuned", "base"):
            raise ValueError(c)
    out.mkdir(parents=True, exist_ok=True)
    taken = {"tuned": 0, "base": 0}
    with contextlib.ExitStack() as stack:
        base_index = {}  # tensor name -> the open base file holding it (each file opened once)
        for f in sorted(base.glob("*.safetensors")):
            bh = stack.enter_context(safe_open(f, framework="pt"))
            base_index.update(dict.fromkeys(bh.keys(), bh))
        for f in sorted(tuned.glob("*.safetensors")):
            tensors = {}
            with safe_open(f, framework="pt") as fh:
                meta = fh.metadata()
                for k in fh.keys():
                    t = fh.get_tensor(k)
                    source = ffn if component_of(k) == "ffn" else attention
                    if source == "base":
                        if k not in base_index:
                            raise _ckpt.CheckpointError(f"{base}: has no tensor {k} (not this checkpoint's base)")
                        b = base_index[k].get_tensor(k)
                        if b.shape != t.shape:
                            raise _ckpt.CheckpointError(f"{k}: base shape {tuple(b.shape)} != tuned {tuple(t.shape)}")
                        t = b.to(t.dtype)
                    taken[source] += 1
                    tensors[k] = t.contiguous()
            save_file(tensors, out / f.name, metadata=meta)
    for name in ("config.json", "model.safetensors.index.json"):
        if (tuned / name).exists():
            shutil.copy2(tuned / name, out / name)
    _copy_tokenizer(tuned, out)
    _log(f"{out}: {taken['tuned']} tensors from {tuned.name}, {taken['base']} from the base {base.name}")
    return out


def export_taia(src: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """TAIA export of a LoRA adapter or a fully fine-tuned checkpoint (see module docstring)."""
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out: {out} exists and is not empty")
    meta = _ckpt.read_metadata(src) or {}
    if _ckpt.is_lora_adapter(src):
        base_path = meta.get("base", {}).get("path") or json.loads(
            (src / "adapter_config.json").read_text()).get("base_model_name_or_path")
        split_adapter(src, out, keep="attention")
        digest = meta.get("base", {}).get("digest")
        if digest is None and base_path and Path(base_path).exists():
            digest = _ckpt.base_digest(base_path)
        _ckpt.write_metadata(out, "taia-lora", base_path, digest, source=str(src),
                             components={"attention": "tuned", "ffn": "base"},
                             context_indicator=meta.get("context_indicator"))
        _log(f"attention-only adapter -> {out}")
        return out
    if not _ckpt.is_full_checkpoint(src):
        raise SystemExit(f"{src} is neither a LoRA adapter (adapter_config.json) nor a checkpoint (config.json)")
    base_path = _base_of(src, base)
    digest = _ckpt.base_digest(base_path)
    if meta.get("base", {}).get("digest") not in (None, digest):
        raise SystemExit(f"--base: {base_path} is not the base {src.name} was trained from "
                         f"(digest {digest} != {meta['base']['digest']})")
    merge_full(src, base_path, out)
    _ckpt.write_metadata(out, "taia-full", base_path, digest, source=str(src),
                         components={"attention": "tuned", "ffn": "base"},
                         context_indicator=meta.get("context_indicator"))
    return out


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a LoRA adapter folder or a fully fine-tuned checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (must be new or empty)")
    p.add_argument("--base", default=None,
                   help="base checkpoint (full checkpoints only; default: the base in the source's steerserve.json)")
