"""The server config file: named steering profiles and A/B experiments over them.

    # steerserve.yaml (or .json)
    profiles:
      gentle: {infosteer: {alpha: 1.2, layers: [10, 11, 12, 13]}}
      lift:   {infosteer: {mode: lift, alpha: 2.0, p: 0.02}}
    experiments:
      tone: {arms: [{name: control}, {name: gentle, profile: gentle, weight: 3}]}

Loaded and validated against the served model before vLLM starts (`steerserve serve --config`),
and again by the API process (`load_for_server`), so a bad file refuses to start with a message
naming the file, the profile (or experiment) and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .experiments import Experiment, parse_experiments
from .schema import ModelInfo, SteerError, normalise, parse_spec

CONFIG_ENV = "STEERSERVE_CONFIG"
TOP_LEVEL_KEYS = ("profiles", "experiments")


@dataclass(frozen=True)
class ServerConfig:
    profiles: dict[str, dict] = field(default_factory=dict)
    experiments: dict[str, Experiment] = field(default_factory=dict)


class ConfigError(ValueError):
    pass


def _read(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml.YAMLError / json.JSONDecodeError: report, do not trace back
        raise ConfigError(f"{path}: cannot parse: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with the keys {', '.join(TOP_LEVEL_KEYS)}")
    return data


def load_config(path: str | Path, info: ModelInfo | None) -> ServerConfig:
    """Read the config file and validate every profile (against `info` when given) and experiment."""
    path = Path(path)
    data = _read(path)
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_LEVEL_KEYS)}")
    profiles = data.get("profiles") or {}  # experiments are checked against these below
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: `profiles` must be a mapping of name -> steer object")
    for name, steer in profiles.items():
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ConfigError(f"{path}: profile name {name!r} must be a non-empty string of at most 128 characters")
        try:
            if isinstance(steer, dict) and "profile" in steer:
                raise SteerError("steer.profile", "profiles cannot name other profiles")
            if info is None:
                parse_spec(steer)
            else:
                normalise(steer, info)
        except SteerError as err:
            raise ConfigError(f"{path}: profile {name!r}: {err.field}: {err.message}") from None
    try:
        experiments = parse_experiments(data.get("experiments"), profiles, str(path))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return ServerConfig(profiles, experiments)


def load_for_server(info: ModelInfo) -> ServerConfig:
    """The config named by $STEERSERVE_CONFIG (set by `steerserve serve --config`), or an empty one."""
    path = os.environ.get(CONFIG_ENV)
    return load_config(path, info) if path else ServerConfig()
