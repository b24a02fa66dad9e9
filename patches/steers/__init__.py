"""The steers steerserve serves: one package each behind one interface (`base.Steer`), listed once
here. The request schema (`server.schema.SteerSpec`), plan parsing and the plan container
(`patches.plan.SteerPlan`), the echo, the metrics labels and the client builder are derived from
this list, in this order (the echo's order). Adding a steer: a package with its `STEER`, and one
line below (README, "Adding a steer").

Torch-free and vLLM-free (the client builder imports it).
"""

from __future__ import annotations

from .base import ModelInfo, ServingContext, Steer, SteerError
from .context_attention import STEER as _context_attention
from .context_indicator import STEER as _context_indicator
from .infosteer import STEER as _infosteer
from .mixing import STEER as _mixing
from .proxy import STEER as _proxy
from .vectors import STEER as _vectors

STEERS: tuple[Steer, ...] = (
    _vectors,
    _infosteer,
    _context_attention,
    _mixing,
    _proxy,
    _context_indicator,
)
BY_NAME: dict[str, Steer] = {s.name: s for s in STEERS}

__all__ = ["BY_NAME", "STEERS", "ModelInfo", "ServingContext", "Steer", "SteerError"]
