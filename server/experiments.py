"""Online A/B experiments: named sets of arms (profiles, or no steering) with traffic weights.

    experiments:
      tone:
        arms:
          - {name: control}                      # no steering
          - {name: gentle, profile: gentle, weight: 3}

A request opts in with `steer: {"experiment": "tone"}` and a unit key (the OpenAI `user` field, or
the `X-Steerserve-Unit` header). Assignment hashes (experiment, unit key): deterministic, sticky
per unit key, and honours the weights; the arm's profile decides the steering.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from .limits import shown
from .schema import SteerError

UNIT_HEADER = "x-steerserve-unit"
MAX_ARMS = 16


@dataclass(frozen=True)
class ExperimentArm:
    name: str
    profile: str | None  # None: no steering
    weight: float


@dataclass(frozen=True)
class Experiment:
    name: str
    arms: tuple[ExperimentArm, ...]

    def assign(self, unit: str) -> ExperimentArm:
        """The arm of `unit`: a uniform draw from sha256(name, unit) against the cumulative weights."""
        digest = hashlib.sha256(f"{self.name}\x00{unit}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2.0**64  # [0, 1)
        total = sum(arm.weight for arm in self.arms)
        acc = 0.0
        for arm in self.arms:
            acc += arm.weight / total
            if draw < acc:
                return arm
        return self.arms[-1]


def parse_experiments(raw: object, profiles: dict[str, dict], where: str) -> dict[str, Experiment]:
    """Validate the `experiments` mapping of a config file; raises ValueError naming `where`,
    the experiment and the field."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: `experiments` must be a mapping of name -> {{arms: [...]}}")
    out = {}
    for name, spec in raw.items():
        at = f"{where}: experiment {name!r}"
        if not isinstance(spec, dict) or set(spec) != {"arms"}:
            raise ValueError(f"{at}: must be a mapping with exactly the key `arms`")
        arms_raw = spec["arms"]
        if not isinstance(arms_raw, list) or not 1 <= len(arms_raw) <= MAX_ARMS:
            raise ValueError(f"{at}: arms: must be a list of 1..{MAX_ARMS} arms")
        arms = []
        for i, arm in enumerate(arms_raw):
            field = f"{at}: arms[{i}]"
            if not isinstance(arm, dict) or "name" not in arm or set(arm) - {"name", "profile", "weight"}:
                raise ValueError(f"{field}: must be a mapping with `name` and optional `profile`, `weight`")
            arm_name, profile, weight = arm["name"], arm.get("profile"), arm.get("weight", 1)
            if not isinstance(arm_name, str) or not arm_name:
                raise ValueError(f"{field}.name: must be a non-empty string")
            if profile is not None and profile not in profiles:
                known = ", ".join(sorted(profiles)) or "none"
                raise ValueError(f"{field}.profile: unknown profile {profile!r}; known profiles: {known}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                    math.isfinite(weight) and weight > 0):
                raise ValueError(f"{field}.weight: must be a positive number, got {weight!r}")
            arms.append(ExperimentArm(arm_name, profile, float(weight)))
        if len({a.name for a in arms}) != len(arms):
            raise ValueError(f"{at}: arm names must be unique")
        out[name] = Experiment(name, tuple(arms))
    return out


def resolve_experiment(raw: object, experiments: dict[str, Experiment], unit: str | None
                       ) -> tuple[object, tuple[str, str] | None]:
    """Replace `{"experiment": name}` by the assigned arm's steer (`{"profile": p}` or `{}`).
    Returns (steer object, (experiment, arm) or None)."""
    if not isinstance(raw, dict) or raw.get("experiment") is None:  # null: no experiment
        return ({k: v for k, v in raw.items() if k != "experiment"} if isinstance(raw, dict) else raw), None
    name = raw["experiment"]
    if not isinstance(name, str) or name not in experiments:
        known = ", ".join(sorted(experiments)) or "none (start the server with --config)"
        raise SteerError("steer.experiment", f"unknown experiment {shown(name)}; known experiments: {known}")
    if len(raw) > 1:
        raise SteerError("steer.experiment", "cannot be combined with other steer fields: the arm decides the steering")
    if not unit:
        raise SteerError("user", "an experiment needs a unit key: the OpenAI `user` field or the "
                                 "X-Steerserve-Unit header")
    arm = experiments[name].assign(unit)
    return ({"profile": arm.profile} if arm.profile else {}), (name, arm.name)
