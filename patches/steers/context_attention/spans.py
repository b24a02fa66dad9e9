"""Emphasised spans for context-attention steering: which prompt tokens the steer keeps attention on.

Modes (`steer.context_attention.emphasis`):
- "user" (chat default): the content tokens of every user message; template tokens, BOS, the system
  prompt and the generation prefix are not emphasised.
- "last_user": the content tokens of the last user message only.
- "marked": only text the client wraps in `<emphasis>` ... `</emphasis>` (in any message, or in a
  /v1/completions prompt). The markers are removed before the model sees the text.

How spans are found (exact, template-agnostic): the chat is rendered twice by the same renderer,
once as sent and once with every message's content replaced by a sentinel; the sentinel positions
give each message's character range in the real rendering (checked by rebuilding the real text from
the sentinel text). The real text is tokenised with character offsets (the result must equal the
engine's prompt token ids); a token is emphasised when its characters overlap an emphasised range.

Pure Python (plus a Hugging Face fast tokenizer); used by the API server and the offline commands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MARK_OPEN = "<emphasis>"
MARK_CLOSE = "</emphasis>"
MAX_MARKED_SPANS = 256
EMPHASIS_MODES = ("user", "last_user", "marked")
FIELD = "steer.context_attention.emphasis"
_MARK_RE = re.compile(re.escape(MARK_OPEN) + "|" + re.escape(MARK_CLOSE))
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class SpanError(ValueError):
    """A request whose emphasis cannot be resolved; `field` names the request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def strip_markers(text: str, field: str = "messages") -> tuple[str, list[tuple[int, int]]]:
    """Remove `<emphasis>`/`</emphasis>` markers; returns (clean text, marked [start, end) character
    ranges of the clean text). Raises SpanError on unbalanced or nested markers."""
    out: list[str] = []
    ranges: list[tuple[int, int]] = []
    pos = 0
    clean_len = 0
    open_at: int | None = None
    for m in _MARK_RE.finditer(text):
        out.append(text[pos : m.start()])
        clean_len += m.start() - pos
        pos = m.end()
        if m.group() == MARK_OPEN:
            if open_at is not None:
                raise SpanError(field, f"nested {MARK_OPEN} at character {m.start()}; markers cannot nest")
            open_at = clean_len
        else:
            if open_at is None:
                raise SpanError(field, f"{MARK_CLOSE} at character {m.start()} has no matching {MARK_OPEN}")
            if clean_len > open_at:
                ranges.append((open_at, clean_len))
            open_at = None
    if open_at is not None:
        raise SpanError(field, f"{MARK_OPEN} is never closed with {MARK_CLOSE}")
    out.append(text[pos:])
    if len(ranges) > MAX_MARKED_SPANS:
        raise SpanError(field, f"{len(ranges)} marked spans; at most {MAX_MARKED_SPANS} per request")
    return "".join(out), ranges


def has_markers(text: str) -> bool:
    return MARK_OPEN in text or MARK_CLOSE in text


@dataclass
class MarkedMessages:
    """Messages with markers removed: `messages` (a copy) and per message index the marked ranges
    of its clean text content."""

    messages: list
    marked: dict[int, list[tuple[int, int]]]


def strip_message_markers(messages: list) -> MarkedMessages:
    """Remove markers from every message's text (string content or text parts); a message whose
    content is a list of parts gets the ranges of its parts joined with newlines, as vLLM renders
    text parts. Raises SpanError naming the message."""
    out, marked = [], {}
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            clean, ranges = strip_markers(content, f"messages[{i}].content")
            out.append({**msg, "content": clean})
        elif isinstance(content, list):
            parts, ranges, offset = [], [], 0
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    clean, rs = strip_markers(part["text"], f"messages[{i}].content[{j}].text")
                    ranges += [(a + offset, b + offset) for a, b in rs]
                    offset += len(clean) + 1
                    parts.append({**part, "text": clean})
                else:
                    parts.append(part)
            out.append({**msg, "content": parts})
        else:
            out.append(msg)
            continue
        if ranges:
            marked[i] = ranges
    return MarkedMessages(out, marked)


def sentinel_messages(messages: list) -> list:
    """Each message's text content replaced by a sentinel naming its index (other parts kept)."""
    out = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str) or (
            isinstance(content, list) and content and all(
                isinstance(p, dict) and p.get("type") == "text" for p in content)
        ):
            out.append({**msg, "content": _SENTINEL.format(i)})
        else:
            out.append(msg)
    return out


def message_ranges(real_text: str, sentinel_text: str, contents: dict[int, str]) -> dict[int, tuple[int, int]]:
    """Character range of each message's content in `real_text`, from the sentinel rendering.

    `contents[i]` is message i's text as the template received it. Raises SpanError when the
    sentinel rendering does not rebuild the real text (a template that rewrites message text)."""
    ranges: dict[int, tuple[int, int]] = {}
    rebuilt: list[str] = []
    pos = 0
    for m in _SENTINEL_RE.finditer(sentinel_text):
        i = int(m.group(1))
        rebuilt.append(sentinel_text[pos : m.start()])
        start = sum(len(x) for x in rebuilt)
        content = contents.get(i, "")
        candidates = [content, content.strip()]
        chosen = next((c for c in candidates if real_text.startswith(c, start)), None)
        if chosen is None:
            raise SpanError(FIELD, "could not locate the messages in the rendered prompt (the chat template "
                                   "rewrites message text); use emphasis \"marked\" on /v1/completions instead")
        rebuilt.append(chosen)
        ranges[i] = (start, start + len(chosen))
        pos = m.end()
    rebuilt.append(sentinel_text[pos:])
    if "".join(rebuilt) != real_text:
        raise SpanError(FIELD, "could not locate the messages in the rendered prompt (the chat template "
                               "rewrites message text); use emphasis \"marked\" on /v1/completions instead")
    return ranges


def emphasised_char_ranges(mode: str, roles: list[str], ranges: dict[int, tuple[int, int]],
                           marked: dict[int, list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """The emphasised character ranges of the rendered chat for `mode`."""
    if mode == "marked":
        out = []
        for i, rs in sorted(marked.items()):
            if i not in ranges:
                raise SpanError(FIELD, f"messages[{i}]: marked text in a message the template does not render")
            base = ranges[i][0]
            out += [(base + a, base + b) for a, b in rs]
        if not out:
            raise SpanError(FIELD, f'"marked" needs text wrapped in {MARK_OPEN} ... {MARK_CLOSE}; none found')
        return out
    users = [i for i, role in enumerate(roles) if role == "user" and i in ranges]
    if mode == "last_user":
        users = users[-1:]
    out = [ranges[i] for i in users if ranges[i][1] > ranges[i][0]]
    if not out:
        raise SpanError(FIELD, f'"{mode}" emphasises user message content, and the request has none (empty)')
    return out


def token_spans(offsets: list[tuple[int, int]], char_ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Merged [start, end) token index spans of the tokens whose characters overlap a range."""
    char_ranges = sorted(char_ranges)
    spans: list[list[int]] = []
    for t, (a, b) in enumerate(offsets):
        if b <= a:
            continue
        if any(a < re_ and b > rs for rs, re_ in char_ranges):
            if spans and spans[-1][1] == t:
                spans[-1][1] = t + 1
            else:
                spans.append([t, t + 1])
    return tuple((a, b) for a, b in spans)


def tokenise_with_offsets(tokenizer, text: str, expected_ids: list[int]) -> list[tuple[int, int]]:
    """Character offsets of `expected_ids` (the engine's prompt) from tokenising `text` again; raises
    SpanError when the ids do not come out the same."""
    for special in (False, True):
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        if list(enc["input_ids"]) == list(expected_ids):
            return [tuple(o) for o in enc["offset_mapping"]]
    raise SpanError(FIELD, "could not map the emphasis onto the prompt tokens (the prompt does not "
                           "re-tokenise to the engine's token ids)")


def resolve(mode: str, tokenizer, text: str, token_ids: list[int], char_ranges: list[tuple[int, int]]):
    """Token spans of `char_ranges` over the engine's prompt; raises SpanError when empty."""
    spans = token_spans(tokenise_with_offsets(tokenizer, text, token_ids), char_ranges)
    if not spans:
        raise SpanError(FIELD, f'"{mode}": the emphasised text covers no prompt token')
    return spans


def rendered_chat_spans(mode: str, tokenizer, real_text: str, sentinel_text: str, messages: list,
                        marked: dict[int, list[tuple[int, int]]], token_ids: list[int]) -> tuple[tuple[int, int], ...]:
    """Emphasised token spans of a chat rendered twice by one renderer (as sent, and with
    `sentinel_messages`): `messages` as the template received them, `token_ids` the prompt's.
    The one path for the server (vLLM's renderer) and the offline commands (the tokenizer's)."""
    contents = {i: _text_of(m) for i, m in enumerate(messages)}
    ranges = message_ranges(real_text, sentinel_text, contents)
    roles = [m.get("role", "") if isinstance(m, dict) else "" for m in messages]
    chars = emphasised_char_ranges(mode, roles, ranges, marked)
    return resolve(mode, tokenizer, real_text, token_ids, chars)


def chat_spans(tokenizer, messages: list, mode: str, add_generation_prompt: bool = True,
               **template_kwargs) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    """Offline: (prompt token ids, emphasised token spans) of a chat rendered with the tokenizer's
    own chat template (what the server does, without vLLM). Markers are removed first."""
    stripped = strip_message_markers(messages)
    # text parts joined with newlines, as vLLM renders them for "string" content-format templates
    stripped.messages = [{**m, "content": _text_of(m)} if isinstance(m.get("content"), list) else m
                         for m in stripped.messages]
    real = tokenizer.apply_chat_template(stripped.messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **template_kwargs)
    sentinel = tokenizer.apply_chat_template(sentinel_messages(stripped.messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **template_kwargs)
    ids = list(tokenizer(real, add_special_tokens=False)["input_ids"])
    return ids, rendered_chat_spans(mode, tokenizer, real, sentinel, stripped.messages, stripped.marked, ids)


def _text_of(message) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""
