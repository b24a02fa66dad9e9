"""`steerserve train vectors`: extract a residual steering vector from contrastive pairs.

Each pair is a positive and a negative text (or chat conversation) that differ in the concept to
steer. For every pair and layer, the residual stream after decoder layer i at the last token is
read with a forward hook (Hugging Face model, float32); per layer the direction is
- `pca_diff` (repeng's default): the first principal component of the paired differences
  (positive - negative, centred as scikit-learn's PCA does), unit norm, its sign chosen so that
  positives project above their negatives in most pairs (repeng's rule);
- `caa` (contrastive activation addition): the mean paired difference (its natural norm).
Both are written as steerserve's safetensors (`NAME.safetensors`, metadata naming the base model)
and as a llama.cpp / repeng control-vector GGUF (`NAME.gguf`); `steerserve serve --vector NAME=FILE`
loads either.

Data: `--pairs FILE.jsonl`, one `{"positive": ..., "negative": ...}` per line, each a string
(used as is) or a list of chat messages (rendered with the model's chat template); or
`--persona POSITIVE,NEGATIVE`, repeng's persona recipe on steerserve's built-in statements
(`training/vector_data.py`): "Act as if you're extremely POSITIVE." as the user turn, a partial
assistant reply after it, the same reply after the NEGATIVE persona.

Layer convention: `direction.i` is added after decoder layer i (0-based), as repeng and llama.cpp
read it. repeng reads the last layer's state after the model's final norm (Hugging Face's last
`hidden_states`); steerserve reads every layer before it, where the engine adds the vector.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

METHODS = ("pca_diff", "caa")


@dataclass(frozen=True)
class Pair:
    positive: str
    negative: str


class VectorTrainingError(ValueError):
    pass


def add_vector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--pairs", default=None, metavar="FILE",
                      help='JSONL of {"positive": ..., "negative": ...} (strings, or lists of chat messages)')
    data.add_argument("--persona", default=None, metavar="POSITIVE,NEGATIVE",
                      help="repeng-style persona pairs on the built-in statements, e.g. happy,sad")
    p.add_argument("--method", choices=METHODS, default="pca_diff",
                   help="pca_diff: first principal component of paired differences, unit norm (repeng's default); "
                        "caa: mean paired difference (default pca_diff)")
    p.add_argument("--layers", default=None,
                   help='"all" or comma-separated 0-based layer indices (default: every layer but 0, as repeng)')
    p.add_argument("--max-pairs", type=int, default=None, help="use at most this many pairs (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="output path without suffix: writes PATH.safetensors and PATH.gguf")


def _log(msg: str) -> None:
    print(f"[train vectors] {msg}", file=sys.stderr, flush=True)


def render(tokenizer, value, where: str) -> str:
    """A pair member: a string as is, a list of chat messages through the chat template."""
    if isinstance(value, str):
        if not value:
            raise VectorTrainingError(f"{where}: empty text")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in value):
        return tokenizer.apply_chat_template(value, tokenize=False)
    raise VectorTrainingError(f"{where}: must be a string or a list of {{role, content}} chat messages")


def load_pairs(path: str | Path, tokenizer) -> list[Pair]:
    """The pairs of a JSONL file; errors name the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise VectorTrainingError(f"{path}: no such file")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise VectorTrainingError(f"{path}:{n}: not JSON ({err})") from None
        if not isinstance(row, dict) or set(row) - {"positive", "negative"} or len(row) != 2:
            raise VectorTrainingError(f'{path}:{n}: expected an object with exactly "positive" and "negative"')
        pairs.append(Pair(render(tokenizer, row["positive"], f"{path}:{n}: positive"),
                          render(tokenizer, row["negative"], f"{path}:{n}: negative")))
    if len(pairs) < 2:
        raise VectorTrainingError(f"{path}: {len(pairs)} pairs; at least 2 are needed")
    return pairs


def persona_pairs(tokenizer, positive: str, negative: str, statements: list[str] | None = None) -> list[Pair]:
    """repeng's persona recipe: every token prefix of every statement as a partial assistant
    reply after the POSITIVE and after the NEGATIVE persona instruction."""
    from .vector_data import PERSONA_TEMPLATE, STATEMENTS

    def prompt(persona: str) -> str:
        messages = [{"role": "user", "content": PERSONA_TEMPLATE.format(persona=persona)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    pos, neg = prompt(positive), prompt(negative)
    pairs = []
    for statement in statements or STATEMENTS:
        tokens = tokenizer.tokenize(statement)
        for i in range(1, len(tokens) + 1):
            suffix = tokenizer.convert_tokens_to_string(tokens[:i])
            pairs.append(Pair(pos + suffix, neg + suffix))
    return pairs


def decoder_layers(model) -> torch.nn.ModuleList:
    return getattr(model, "model", model).layers


@torch.no_grad()
def last_token_states(model, tokenizer, texts: list[str], layers: list[int], batch_size: int = 16,
                      desc: str = "reading hidden states") -> dict[int, np.ndarray]:
    """{layer: [len(texts), hidden] float32}: the residual stream after each of `layers` at each
    text's last token (right padding, as repeng)."""
    captured: dict[int, torch.Tensor] = {}
    blocks = decoder_layers(model)

    def hook(i):
        def fn(_module, _args, output):
            captured[i] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [blocks[i].register_forward_hook(hook(i)) for i in layers]
    out: dict[int, list[np.ndarray]] = {i: [] for i in layers}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, file=sys.stderr):
            batch = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[start:start + batch_size]]
            width = max(len(x) for x in batch)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch], device=model.device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch], device=model.device)
            model(input_ids=ids, attention_mask=mask)
            last = torch.tensor([len(x) - 1 for x in batch], device=model.device)
            rows = torch.arange(len(batch), device=model.device)
            for i in layers:
                out[i].append(captured[i][rows, last].float().cpu().numpy())
    finally:
        for h in handles:
            h.remove()
    return {i: np.concatenate(v) for i, v in out.items()}


def direction(h_pos: np.ndarray, h_neg: np.ndarray, method: str) -> np.ndarray:
    """One layer's direction from the positives' and negatives' states ([pairs, hidden] each)."""
    diff = (h_pos - h_neg).astype(np.float64)
    if method == "caa":
        return diff.mean(axis=0).astype(np.float32)
    if method != "pca_diff":
        raise VectorTrainingError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    centred = diff - diff.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    d = vt[0]
    # repeng's sign rule: positives should project above their negatives in most pairs
    proj_pos, proj_neg = h_pos.astype(np.float64) @ d, h_neg.astype(np.float64) @ d
    if np.mean(proj_pos < proj_neg) > np.mean(proj_pos > proj_neg):
        d = -d
    return d.astype(np.float32)


def train_vectors(model, tokenizer, pairs: list[Pair], layers: list[int], method: str = "pca_diff",
                  batch_size: int = 16) -> dict[int, np.ndarray]:
    """{layer: direction} from contrastive pairs (see the module docstring)."""
    texts = [t for p in pairs for t in (p.positive, p.negative)]
    states = last_token_states(model, tokenizer, texts, layers, batch_size)
    return {i: direction(states[i][0::2], states[i][1::2], method) for i in layers}


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    if text is None:
        return list(range(1, num_layers))
    if text == "all":
        return list(range(num_layers))
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise VectorTrainingError(f'--layers {text!r}: "all" or comma-separated integers') from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise VectorTrainingError(f"--layers: {bad or 'none'} out of range; the model has layers 0..{num_layers - 1}")
    return layers


def run_train_vectors(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerserve.patches.steers.vectors import files
    from steerserve.server.model_store import resolve_model

    from . import checkpoints as ck

    model_dir = resolve_model(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if args.persona:
            positive, sep, negative = args.persona.partition(",")
            if not sep or not positive.strip() or not negative.strip():
                raise VectorTrainingError(f"--persona {args.persona!r}: expected POSITIVE,NEGATIVE, e.g. happy,sad")
            pairs = persona_pairs(tokenizer, positive.strip(), negative.strip())
            source = f"persona:{positive.strip()},{negative.strip()}"
        else:
            pairs = load_pairs(args.pairs, tokenizer)
            source = f"pairs:{Path(args.pairs).name}"
        if args.max_pairs:
            pairs = pairs[: args.max_pairs]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        num_layers = len(decoder_layers(model))
        layers = parse_layers(args.layers, num_layers)
    except VectorTrainingError as err:
        raise SystemExit(f"steerserve train vectors: {err}") from None
    _log(f"{len(pairs)} pairs ({source}), method {args.method}, layers {layers[0]}..{layers[-1]} "
         f"({len(layers)}) of {model_dir.name}")
    directions = train_vectors(model, tokenizer, pairs, layers, args.method, args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"base_model": model_dir.name, "base_digest": ck.base_digest(model_dir), "method": args.method,
            "model_type": model.config.model_type, "hidden_size": str(model.config.hidden_size),
            "num_layers": str(num_layers), "source": source, "pairs": str(len(pairs))}
    files.write_safetensors(out.with_suffix(".safetensors"), directions, meta)
    files.write_gguf(out.with_suffix(".gguf"), directions, model.config.model_type)
    norms = [float(np.linalg.norm(d)) for d in directions.values()]
    _log(f"wrote {out.with_suffix('.safetensors')} and {out.with_suffix('.gguf')} (norm per layer "
         f"{min(norms):.3g}..{max(norms):.3g}); serve with --vector {out.name}={out.with_suffix('.safetensors')}")
