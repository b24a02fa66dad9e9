"""Proxy tuning's reference (arXiv 2401.08565): three Hugging Face models, as the paper's code runs
them. Used by the parity tests and as the benchmarks' baseline."""

from __future__ import annotations

import torch


def proxy_combine(base_logits: torch.Tensor, expert_logits: torch.Tensor, anti_logits: torch.Tensor,
                  alpha: float) -> torch.Tensor:
    """base + alpha * (expert - anti_expert) in float32, the experts cut to the base's vocabulary
    (a larger padded expert vocabulary is cut, as the reference code does)."""
    vocab = base_logits.shape[-1]
    return base_logits.float() + alpha * (expert_logits[..., :vocab].float() - anti_logits[..., :vocab].float())


@torch.no_grad()
def proxy_token_logprobs(base, expert, anti, prompt_ids: list[int], output_ids: list[int],
                         alpha: float) -> list[float]:
    """Log-probability of each of `output_ids` after `prompt_ids` under the proxy-tuned distribution
    (teacher forcing, all three models see the same tokens)."""
    ids = torch.tensor([prompt_ids + output_ids], device=base.device)
    logits = proxy_combine(base(ids).logits[0], expert(ids).logits[0], anti(ids).logits[0], alpha)
    logprobs = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    return [logprobs[n - 1 + i, tok].item() for i, tok in enumerate(output_ids)]


@torch.no_grad()
def proxy_generate(base, expert, anti, batch_ids: list[list[int]], max_new_tokens: int, alpha: float,
                   pad_token_id: int, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Proxy-tuned generation with the three models batched and stepped together, each with its own
    KV cache (the Hugging Face baseline: left padding, greedy when temperature is 0). No stop
    handling: exactly `max_new_tokens` per row."""
    device = base.device
    width = max(len(x) for x in batch_ids)
    ids = torch.tensor([[pad_token_id] * (width - len(x)) + x for x in batch_ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch_ids], device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    models = (base, expert, anti)
    past = [None, None, None]
    out: list[list[int]] = [[] for _ in batch_ids]
    step_ids = ids
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        logits = []
        for i, m in enumerate(models):
            res = m(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=past[i],
                    use_cache=True)
            past[i] = res.past_key_values
            logits.append(res.logits[:, -1])
        combined = proxy_combine(*logits, alpha)
        if temperature > 0:
            probs = torch.softmax(combined / temperature, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen).to(device)
        else:
            nxt = combined.argmax(-1, keepdim=True)
        for row, tok in enumerate(nxt[:, 0].tolist()):
            out[row].append(tok)
        step_ids = nxt
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return out
