"""Context-dependency indicator (arXiv 2411.02688): mark the training conversations whose responses
depend on the user's context, so a tuned model can be told at inference to rely on the context.

Score of a conversation (with the model being tuned, before tuning): at one middle layer, for each
response (assistant-labelled) token, the attention mass its query puts on user-message content
tokens, maxed over heads; the score is the mean over response tokens. Conversations scoring at or
above the threshold get the indicator text appended to every user message before tokenising; the
trained checkpoint records the text in `steerserve.json` (`context_indicator`), and the server
appends it to user messages of requests that ask `steer.context_indicator: true` (and answers 400
for models trained without it).

The indicator is plain text (default " [ctx]"), not a new vocabulary entry: the vocabulary stays the
base's, so LoRA adapters, TAIA exports and proxy experts remain compatible with the base.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from steerserve.patches.steers.context_indicator import apply_indicator  # noqa: F401  (re-exported)
from steerserve.patches.steers.context_attention import spans as _spans

from .data import message_char_ranges

DEFAULT_TEXT = " [ctx]"


def _user_and_response_positions(tokenizer, messages: list[dict], max_len: int):
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ranges = message_char_ranges(tokenizer, messages, text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])[:max_len]
    offsets = enc["offset_mapping"][:max_len]

    def positions(role: str) -> list[int]:
        chars = [ranges[i] for i, m in enumerate(messages) if m["role"] == role and i in ranges]
        return [t for start, end in _spans.token_spans(offsets, chars) for t in range(start, end)]

    return ids, positions("user"), positions("assistant")


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], max_len: int,
                        layer: int | None = None) -> list[float]:
    """Per conversation: mean over response tokens of max over heads of attention mass on user
    tokens at `layer` (default: the middle layer). Runs the model with eager attention."""
    n_layers = model.config.num_hidden_layers
    layer = n_layers // 2 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"--indicator-layer: {layer} is outside [0, {n_layers - 1}]")
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    scores = []
    try:
        for conv in tqdm(conversations, desc="scoring context dependency", file=sys.stderr):
            ids, user, resp = _user_and_response_positions(tokenizer, conv, max_len)
            if not user or not resp:
                scores.append(0.0)
                continue
            out = model(torch.tensor([ids], device=model.device), output_attentions=True)
            att = out.attentions[layer][0].float()  # [heads, T, T]
            mass = att[:, resp][:, :, user].sum(-1)  # [heads, |resp|]
            scores.append(mass.max(dim=0).values.mean().item())
    finally:
        model.set_attn_implementation(previous)
    return scores


def threshold_for(scores: list[float], quantile: float) -> float:
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"--indicator-quantile: {quantile} is outside [0, 1]")
    return float(torch.tensor(scores).quantile(quantile).item())


def suffixes(scores: list[float], threshold: float, text: str = DEFAULT_TEXT) -> list[str]:
    """The indicator text for conversations at or above `threshold`, else ""."""
    return [text if s >= threshold else "" for s in scores]



