"""InfoSteer during training (arXiv 2507.05158): the forward intervention and the entropy regulariser.

- Forward intervention: on the chosen layers, each token's FFN memory coefficients (the input of
  `down_proj`) are rewritten by the same `lift` formula the server applies at inference
  (`steerserve.patches.steers.infosteer.formulas.apply_one`): the m = floor(p * d_ffn) smallest coefficients are set
  to alpha times the token's mean coefficient. Gradients flow through the rewritten tensor.
- Regulariser: L = L_LM - lambda * sum_l H(k_hat_l), with H the mean over the batch's real (non-pad)
  tokens of the entropy of k_hat = |c| / sum |c| on each chosen layer l
  (`infosteer.coefficient_entropy`; magnitudes because SwiGLU coefficients are signed). Maximising
  the entropy pushes the model to read more of its FFN memories instead of a few.

`InfoSteerTraining` installs forward pre-hooks on `down_proj`; it works on plain Hugging Face
models and on peft-wrapped ones (modules are found by name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from steerserve.patches.steers.infosteer import formulas as infosteer

_DOWN_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$")


@dataclass(frozen=True)
class InfoSteerTrainConfig:
    layers: tuple[int, ...]
    lam: float = 0.0  # regulariser weight lambda (0: no regulariser)
    alpha: float = 1.0  # lift target: alpha * mean(c)
    p: float = 0.0  # fraction of coefficients lifted per token (0: no forward intervention)

    @property
    def active(self) -> bool:
        return self.lam > 0 or self.p > 0

    def describe(self) -> dict:
        return {"layers": list(self.layers), "lambda": self.lam, "lift_alpha": self.alpha, "lift_p": self.p}


def down_proj_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Layer index -> `down_proj` module (the base Linear under a peft wrapper when present)."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        m = _DOWN_RE.search(name)
        if m and int(m.group(1)) not in found:
            found[int(m.group(1))] = module
    return found


class InfoSteerTraining:
    """Hooks that apply the intervention and collect per-layer entropies of one forward pass."""

    def __init__(self, model: torch.nn.Module, config: InfoSteerTrainConfig):
        modules = down_proj_modules(model)
        bad = [i for i in config.layers if i not in modules]
        if bad:
            raise ValueError(f"--infosteer-layers: layers {bad} do not exist (the model has {len(modules)})")
        self.config = config
        self.mask: torch.Tensor | None = None  # [batch, seq] 1 for real tokens, set per step
        self.entropies: list[torch.Tensor] = []
        self._handles = [modules[i].register_forward_pre_hook(self._hook) for i in config.layers]

    def _hook(self, module, args):
        (c,) = args[:1]
        cfg = self.config
        if cfg.p > 0:
            m = infosteer.lift_count(cfg.p, c.shape[-1])
            if m > 0:
                c = infosteer.apply_one(c, "lift", cfg.alpha, m=m)
        if cfg.lam > 0 and torch.is_grad_enabled():
            h = infosteer.coefficient_entropy(c)  # [batch, seq]
            if self.mask is not None and self.mask.shape == h.shape:
                w = self.mask.to(h.dtype)
                self.entropies.append((h * w).sum() / w.sum().clamp_min(1))
            else:
                self.entropies.append(h.mean())
        return (c, *args[1:])

    def regulariser(self) -> torch.Tensor | None:
        """sum over layers of the mean entropy (then cleared); None when nothing was collected."""
        if not self.entropies:
            return None
        total = torch.stack(self.entropies).sum()
        self.entropies = []
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
