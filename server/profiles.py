"""The server config file: named steering profiles and A/B experiments over them.

    # steerserve.yaml (or .json)
    head_sets:
      context: heads/context.json        # a file written by `steerserve heads profile`
      early: [[2, 0], [2, 1], [3, 4]]    # or inline [layer, head] pairs
    profiles:
      gentle: {infosteer: {alpha: 1.2, layers: [10, 11, 12, 13]}}
      focus:  {context_attention: {alpha: 0.5, heads: context}}
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
from typing import Callable

from . import head_sets
from .experiments import Experiment, parse_experiments
from .schema import ModelInfo, SteerError, normalise, parse_spec, shown

CONFIG_ENV = "STEERSERVE_CONFIG"
# variants, proxies, vectors: read by `serve` (server/cli.py)
TOP_LEVEL_KEYS = ("profiles", "experiments", "head_sets", "variants", "proxies", "vectors")


@dataclass(frozen=True)
class ServerConfig:
    profiles: dict[str, dict] = field(default_factory=dict)
    experiments: dict[str, Experiment] = field(default_factory=dict)
    head_sets: dict[str, tuple] = field(default_factory=dict)  # name -> ((layer, head), ...)


class ConfigError(ValueError):
    pass


def read_config_file(path: str | Path) -> dict:
    """The parsed config file (a mapping); raises ConfigError."""
    return _read(Path(path))


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


def _head_sets(raw: object, path: Path, info: ModelInfo | None, base: dict[str, tuple]) -> dict[str, tuple]:
    out = dict(base)
    if raw is None:
        return out
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: `head_sets` must be a mapping of name -> file path or [[layer, head], ...]")
    for name, value in raw.items():
        if name in out:
            raise ConfigError(f"{path}: head set {name!r} is defined twice (config file and --head-set)")
        try:
            if isinstance(value, str):
                file = (path.parent / value) if not Path(value).is_absolute() else Path(value)
                out[name] = head_sets.check(name, head_sets.read_head_set(file)["heads"], info, str(path))
            else:
                out[name] = head_sets.check(name, value, info, str(path))
        except head_sets.HeadSetError as err:
            raise ConfigError(str(err)) from None
    return out


def load_config(path: str | Path | None, info: ModelInfo | None,
                extra_head_sets: dict[str, tuple] | None = None) -> ServerConfig:
    """Read the config file and validate every head set, profile (against `info` when given) and
    experiment. `extra_head_sets` come from the command line (already checked)."""
    if path is None:
        return ServerConfig(head_sets=dict(extra_head_sets or {}))
    path = Path(path)
    data = _read(path)
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_LEVEL_KEYS)}")
    sets = _head_sets(data.get("head_sets"), path, info, extra_head_sets or {})
    profiles = data.get("profiles") or {}  # experiments are checked against these below
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: `profiles` must be a mapping of name -> steer object")
    for name, steer in profiles.items():
        if not isinstance(name, str) or not name or len(name) > 128 or MODEL_SEPARATOR in name:
            raise ConfigError(f"{path}: profile name {name!r} must be a non-empty string of at most 128 characters "
                              f"without {MODEL_SEPARATOR!r} (served as MODEL{MODEL_SEPARATOR}PROFILE)")
        try:
            if isinstance(steer, dict) and "profile" in steer:
                raise SteerError("steer.profile", "profiles cannot name other profiles")
            if info is None:
                parse_spec(steer)
            else:
                normalise(steer, info, sets)
        except SteerError as err:
            raise ConfigError(f"{path}: profile {name!r}: {err.field}: {err.message}") from None
    try:
        experiments = parse_experiments(data.get("experiments"), profiles, str(path))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for name in experiments:
        if MODEL_SEPARATOR in name or name in profiles:
            raise ConfigError(f"{path}: experiment {name!r}: experiment names must not contain {MODEL_SEPARATOR!r} "
                              "nor equal a profile's name (both are served as MODEL@NAME)")
    return ServerConfig(profiles, experiments, sets)


MODEL_SEPARATOR = "@"


def split_model_name(model: object, config: ServerConfig,
                     served: Callable[[str], bool]) -> tuple[str, str, str] | None:
    """`MODEL@NAME` -> (MODEL, "profile" or "experiment", NAME) when NAME is a profile or an
    experiment of `config`; None for a name without the separator, or whose MODEL part is not a
    model this server serves (`served`; vLLM then answers as for any unknown model). Raises
    SteerError("model") for a served MODEL with an unknown NAME."""
    if not isinstance(model, str) or MODEL_SEPARATOR not in model:
        return None
    base, _, name = model.rpartition(MODEL_SEPARATOR)
    if name in config.profiles:
        return base, "profile", name
    if name in config.experiments:
        return base, "experiment", name
    if not served(base):
        return None
    known = [f"profiles: {', '.join(sorted(config.profiles)) or 'none'}",
             f"experiments: {', '.join(sorted(config.experiments)) or 'none'}"]
    raise SteerError("model", f"{shown(model)}: {shown(name)} after {MODEL_SEPARATOR!r} is not a profile or experiment "
                              f"of this server ({'; '.join(known)})")


def steer_for_model_name(raw: object, kind: str, name: str) -> dict:
    """The request's `steer` with the model name's profile or experiment added. A profile is the
    base the request's own fields override (as `steer.profile`); an experiment takes no other
    fields. Raises SteerError on a conflict."""
    if raw is None:
        return {kind: name}
    if not isinstance(raw, dict):
        return raw  # the schema reports the type
    if kind == "experiment":
        raise SteerError("steer", f"the model name selects experiment {shown(name)}: an experiment cannot be combined "
                                  "with a `steer` field (the arm decides the steering)")
    if raw.get("experiment") is not None:
        raise SteerError("steer.experiment", f"the model name selects profile {shown(name)}; an experiment cannot be "
                                             "combined with it")
    if raw.get("profile") not in (None, name):
        raise SteerError("steer.profile", f"the model name selects profile {shown(name)} but steer.profile is "
                                          f"{shown(raw['profile'])}: use one of them")
    return {**raw, "profile": name}


def cli_head_sets(info: ModelInfo | None) -> dict[str, tuple]:
    """The head sets named by $STEERSERVE_HEAD_SETS (JSON {name: file}, set by `steerserve serve`)."""
    raw = os.environ.get(head_sets.HEAD_SETS_ENV)
    if not raw:
        return {}
    try:
        return head_sets.load_files(json.loads(raw), info)
    except head_sets.HeadSetError as err:
        raise ConfigError(str(err)) from None


def load_for_server(info: ModelInfo) -> ServerConfig:
    """The config named by $STEERSERVE_CONFIG (set by `steerserve serve --config`) plus the head
    sets of $STEERSERVE_HEAD_SETS."""
    return load_config(os.environ.get(CONFIG_ENV) or None, info, cli_head_sets(info))
