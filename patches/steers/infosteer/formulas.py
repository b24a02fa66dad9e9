"""InfoSteer FFN memory amplification: the math, shared by the engine, the Hugging Face reference
and (later) the trainer.

An FFN `down_proj(act(gate_proj(x)) * up_proj(x))` is a key-value memory: the input of `down_proj`,
c = act(gate_proj(x)) * up_proj(x) in R^d (d = FFN width), holds one coefficient per memory vector
(a row of down_proj's weight). InfoSteer rewrites c per token before `down_proj`:

    scale: c'_i = alpha * c_i                           for every i
    topk:  c'_i = alpha * c_i   if |c_i| is among the k largest magnitudes of the token, else c_i
    lift:  c'_i = alpha * mean_j(c_j)  if c_i is among the m = floor(p * d) smallest (signed) values
           of the token, else c_i   (the paper's forward intervention, arXiv 2507.05158: the bottom
           p fraction of coefficients is raised to alpha times the token's mean coefficient)

All functions are device-agnostic torch and work on a 2-D view [rows, d]; per-row parameters let
one call serve many requests with different settings. Ties in top-k are broken by `torch.topk`.
Products and the mean are computed in float32 and cast back to the input dtype.
"""

from __future__ import annotations

import torch

from . import lift_count  # noqa: F401  (re-exported: the lift count is part of the plan)


def scale_rows(c: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """c: [n, d]; alpha: [n] -> new [n, d]."""
    return (c.float() * alpha.float()[:, None]).to(c.dtype)


def topk_rows(c: torch.Tensor, alpha: torch.Tensor, k: torch.Tensor, kmax: int) -> torch.Tensor:
    """Multiply the k[r] largest-magnitude coefficients of each row r by alpha[r].

    c: [n, d]; alpha: [n]; k: [n] int64 with 1 <= k <= kmax <= d -> new [n, d].
    """
    idx = c.abs().topk(kmax, dim=-1).indices  # [n, kmax], by descending magnitude
    vals = c.gather(-1, idx)
    keep = torch.arange(kmax, device=c.device)[None, :] < k[:, None]  # [n, kmax]
    new = torch.where(keep, (vals.float() * alpha.float()[:, None]).to(c.dtype), vals)
    return c.scatter(-1, idx, new)


def lift_rows(c: torch.Tensor, alpha: torch.Tensor, m: torch.Tensor, mmax: int) -> torch.Tensor:
    """Set the m[r] smallest coefficients of each row r to alpha[r] * mean(row r).

    c: [n, d]; alpha: [n]; m: [n] int64 with 1 <= m <= mmax <= d -> new [n, d].
    """
    target = (c.float().mean(dim=-1) * alpha.float()).to(c.dtype)  # [n]
    idx = c.topk(mmax, dim=-1, largest=False).indices  # [n, mmax], ascending values
    vals = c.gather(-1, idx)
    keep = torch.arange(mmax, device=c.device)[None, :] < m[:, None]
    new = torch.where(keep, target[:, None].expand_as(vals), vals)
    return c.scatter(-1, idx, new)


def apply_one(c: torch.Tensor, mode: str, alpha: float, k: int = 0, m: int = 0) -> torch.Tensor:
    """One configuration on every row of c ([..., d]); returns a new tensor (the reference path)."""
    shape = c.shape
    flat = c.reshape(-1, shape[-1])
    n = flat.shape[0]
    a = torch.full((n,), alpha, dtype=torch.float32, device=c.device)
    if mode == "scale":
        out = scale_rows(flat, a)
    elif mode == "topk":
        out = topk_rows(flat, a, torch.full((n,), k, dtype=torch.long, device=c.device), k)
    elif mode == "lift":
        out = lift_rows(flat, a, torch.full((n,), m, dtype=torch.long, device=c.device), m)
    else:
        raise ValueError(f"unknown InfoSteer mode {mode!r}")
    return out.reshape(shape)


def coefficient_entropy(c: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Entropy of each token's FFN memory distribution k_hat, the InfoSteer training regulariser's
    H(k_hat) (arXiv 2507.05158): c [..., d] -> H [...], in float32, differentiable.

    The paper normalises non-negative (ReLU) coefficients into a distribution. SwiGLU coefficients
    silu(gate) * up are signed, so steerserve normalises magnitudes: k_hat_i = |c_i| / sum_j |c_j|
    (a memory vector read with a negative weight is still read). H ranges over [0, log d]; high H
    means the token spreads its reads over many memories.
    """
    a = c.float().abs()
    p = a / a.sum(dim=-1, keepdim=True).clamp_min(eps)
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=-1)
