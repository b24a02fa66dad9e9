"""`steerserve deploy render`: Kubernetes manifests from one values file.

The packaged `values.yaml` holds every default; a user values file is deep-merged over it and
`--set key.path=value` overrides (YAML scalars) over that. Jinja2 templates in `templates/` turn the
values into one YAML file per object kind, for one of three targets:

- `single-gpu`: a Deployment on the CUDA image, one GPU per replica;
- `cpu`: the same on the CPU image, without GPUs;
- `multi-node`: a Ray head StatefulSet (which runs the server) and a worker StatefulSet on the CUDA
  image, serving one model with tensor x pipeline parallelism over `nodes x gpusPerNode` GPUs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import yaml

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
DEFAULT_VALUES = HERE / "values.yaml"
TARGETS = ("single-gpu", "multi-node", "cpu")
CONFIG_DIR = "/etc/steerserve"
CONFIG_FILE = "steerserve.yaml"
# values subtrees whose keys are the user's own (not checked against the defaults)
FREE_FORM = ("labels", "config", "scheduling.nodeSelector")

# output file -> template, per target; numbered so that `kubectl apply -f DIR` creates the
# Namespace first and the workloads after what they mount
COMMON = {
    "00-namespace.yaml": "namespace.yaml.j2",
    "10-configmap.yaml": "configmap.yaml.j2",
    "11-secret.yaml": "secret.yaml.j2",
    "20-pvc.yaml": "pvc.yaml.j2",
    "40-service.yaml": "service.yaml.j2",
}
FILES = {
    "single-gpu": {**COMMON, "30-deployment.yaml": "deployment.yaml.j2"},
    "cpu": {**COMMON, "30-deployment.yaml": "deployment.yaml.j2"},
    "multi-node": {**COMMON, "30-ray-head.yaml": "ray-head.yaml.j2", "31-ray-workers.yaml": "ray-workers.yaml.j2",
                   "41-ray-head-service.yaml": "ray-head-service.yaml.j2"},
}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _fail(msg: str) -> NoReturn:
    raise SystemExit(f"steerserve deploy render: {msg}")


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    """Deep-merge `over` into a copy of `base`; refuse keys that `base` lacks outside free-form trees."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        path = f"{prefix}{key}"
        free = any(prefix.startswith(f + ".") for f in FREE_FORM)
        if key not in out and not free:
            _fail(f"unknown values key {path!r} (known here: {', '.join(map(str, out)) or 'none'})")
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, path + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_set(item: str, values: dict) -> dict:
    """`a.b.c=VALUE` -> {"a": {"b": {"c": VALUE}}}: VALUE as a YAML scalar, kept verbatim where `values`
    holds a string at that key (so that a tag like 0.10 stays "0.10"; `null` is null everywhere)."""
    key, sep, raw = item.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        _fail(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. multiNode.nodes=4")
    current: Any = values
    for part in parts:
        current = current.get(part) if isinstance(current, dict) else None
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        _fail(f"--set {item!r}: value is not valid YAML: {err}")
    if isinstance(current, str) and value is not None:
        value = raw
    if isinstance(value, (dict, list)):
        _fail(f"--set {item!r}: only scalars; put lists and mappings in a --values file")
    for part in reversed(parts):
        value = {part: value}
    return value


def load_values(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The packaged defaults, deep-merged with the values file at `path` and `key.path=value` overrides."""
    values = yaml.safe_load(DEFAULT_VALUES.read_text())
    if path is not None:
        try:
            user = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            _fail(f"--values {path}: {err}")
        if not isinstance(user, dict):
            _fail(f"--values {path}: expected a mapping at the top level")
        values = _merge(values, user)
    for item in overrides:
        values = _merge(values, _parse_set(item, values))
    return values


def _get(values: dict, dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            _fail(f"missing required value {dotted!r}")
        node = node[part]
    return node


def _string(values: dict, dotted: str, pattern: re.Pattern | None = None, max_len: int = 253) -> str:
    value = _get(values, dotted)
    if not isinstance(value, str) or not value:
        _fail(f"{dotted} must be a non-empty string, got {value!r}")
    if pattern is not None and (not pattern.fullmatch(value) or len(value) > max_len):
        _fail(f"{dotted}={value!r} is not a valid Kubernetes name (lower-case letters, digits, '-'; "
              f"at most {max_len} characters)")
    return value


def _positive_int(values: dict, dotted: str) -> int:
    value = _get(values, dotted)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(f"{dotted} must be a positive integer, got {value!r}")
    return value


def _check_shapes(values: dict, defaults: dict, prefix: str = "") -> None:
    """Every value the defaults have must be there, of the defaults' kind (number, flag, list, mapping)."""
    for key, default in defaults.items():
        path, value = f"{prefix}{key}", values.get(key)
        if value is None:
            if path != "config":  # the one key that may be null: no server config
                _fail(f"missing required value {path!r}")
        elif isinstance(default, bool) or isinstance(value, bool):
            if type(value) is not type(default):
                _fail(f"{path} must be {'true or false' if isinstance(default, bool) else 'a number'}, got {value!r}")
        elif isinstance(default, int) and not isinstance(value, int):
            _fail(f"{path} must be a whole number (default {default}), got {value!r}")
        elif isinstance(default, float) and not isinstance(value, (int, float)):
            _fail(f"{path} must be a number (default {default}), got {value!r}")
        elif isinstance(default, (list, dict)) and not isinstance(value, type(default)):
            _fail(f"{path} must be a {'list' if isinstance(default, list) else 'mapping'}, got {value!r}")
        elif isinstance(default, dict) and path not in FREE_FORM:
            _check_shapes(value, default, path + ".")


def _check(values: dict, target: str) -> None:
    """Refuse values the manifests cannot be right with, naming the key."""
    _check_shapes(values, yaml.safe_load(DEFAULT_VALUES.read_text()))
    _string(values, "name", DNS_1035, 40)
    _string(values, "namespace.name", DNS_1123, 63)
    _string(values, "clusterDomain", DNS_SUBDOMAIN)
    image = "cpu" if target == "cpu" else "cuda"
    _string(values, f"image.{image}.repository")
    tag = str(_get(values, f"image.{image}.tag"))
    if not tag or tag == "latest":
        _fail(f"image.{image}.tag must pin a version, not {tag!r}")
    _string(values, "apiKey.secretName", DNS_1123)
    _string(values, "apiKey.secretKey")
    _positive_int(values, "server.port")
    if _get(values, "model.pvc.name"):
        _string(values, "model.pvc.name", DNS_1123)
        _string(values, "model.pvc.mountPath")
    if target == "multi-node":
        nodes = _positive_int(values, "multiNode.nodes")
        gpus = _positive_int(values, "multiNode.gpusPerNode")
        tp = _positive_int(values, "multiNode.tensorParallelSize")
        pp = _positive_int(values, "multiNode.pipelineParallelSize")
        _positive_int(values, "multiNode.rayPort")
        if nodes < 2:
            _fail("multiNode.nodes must be at least 2 (one machine: the single-gpu target, or -tp with docker)")
        if tp * pp != nodes * gpus:
            _fail(f"multiNode.tensorParallelSize * pipelineParallelSize = {tp} * {pp} = {tp * pp} must equal "
                  f"nodes * gpusPerNode = {nodes} * {gpus} = {nodes * gpus}")
    else:
        key = "cpu.replicas" if target == "cpu" else "singleGpu.replicas"
        if _positive_int(values, key) > 1 and _get(values, "storage.state.accessMode") == "ReadWriteOnce":
            _fail(f"{key} > 1 shares one state volume: set storage.state.accessMode=ReadWriteMany")


def serve_args(values: dict, target: str) -> list[str]:
    """The `steerserve serve` argument list of the serving container (the multi-node head's included)."""
    server, storage = values["server"], values["storage"]
    gpu = target != "cpu"
    args = ["--host", "0.0.0.0", "--port", str(server["port"])]
    if values["model"]["path"]:
        args += ["--model", str(values["model"]["path"])]
    if values["model"]["servedModelName"]:
        args += ["--served-model-name", str(values["model"]["servedModelName"])]
    if values["config"]:
        args += ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}"]
    args += ["--feedback-db", f"{storage['state']['mountPath'].rstrip('/')}/{storage['feedbackDb']}",
             "--max-model-len", str(server["maxModelLen"]), "--dtype", str(server["dtype"]),
             "--kv-cache-gb", f"{server['kvCacheGb']['gpu' if gpu else 'cpu']:g}"]
    if gpu:
        args.append(f"--vllm-arg=--gpu-memory-utilization={server['gpuMemoryUtilization']}")
    if target == "multi-node":
        mn = values["multiNode"]
        args += ["--distributed-executor-backend", "ray",
                 "-tp", str(mn["tensorParallelSize"]), "-pp", str(mn["pipelineParallelSize"])]
    args += [str(a) for a in server["extraArgs"]]
    args += [f"--vllm-arg={a}" for a in server["vllmArgs"]]
    return args


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False,
    )
    # JSON is YAML: every value from the values file goes out as a JSON scalar, list or mapping,
    # so no value can break (or inject into) the YAML around it
    env.filters["q"] = json.dumps
    # a macro's YAML block, placed after N spaces: blank edges dropped, later lines indented by N
    env.filters["ind"] = lambda s, n: textwrap.indent(str(s).strip(), " " * n).lstrip(" ")
    env.filters["sha256"] = lambda s: hashlib.sha256(s.encode()).hexdigest()
    env.filters["toyaml"] = lambda v: yaml.safe_dump(v, sort_keys=False, default_flow_style=False,
                                                     allow_unicode=True)
    return env


def render(values: dict, target: str) -> dict[str, str]:
    """Render the manifests of `target` ("single-gpu", "multi-node" or "cpu"): file name -> YAML text.

    Files whose template renders no object (an optional Secret, Namespace or claim) are left out.
    Every file is checked to parse as YAML.
    """
    if target not in TARGETS:
        _fail(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    _check(values, target)
    env = _environment()
    context = {"v": values, "target": target, "serve_args": serve_args(values, target),
               "config_dir": CONFIG_DIR, "config_file": CONFIG_FILE}
    out: dict[str, str] = {}
    for filename, template in FILES[target].items():
        text = env.get_template(template).render(**context)
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as err:  # a template bug, not a user error: say where
            raise RuntimeError(f"{template} rendered invalid YAML: {err}\n{text}") from err
        if docs:
            out[filename] = text
    return out


def add_render_args(p: argparse.ArgumentParser) -> None:
    """The flags of `steerserve deploy render`."""
    p.add_argument("--target", required=True, metavar="|".join(TARGETS),
                   help="single-gpu (Deployment, 1 GPU per replica), multi-node (Ray head + workers) or cpu")
    p.add_argument("--values", default=None, metavar="FILE", help="values file merged over deploy/values.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one value (repeatable), e.g. --set multiNode.nodes=4")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the manifests into")


def run_render(args: argparse.Namespace) -> list[Path]:
    """Render per parsed `args` and write the files into `args.out`; print and return their paths."""
    files = render(load_values(args.values, args.overrides), args.target)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(out / name)
        print(f"wrote {out / name}")
    # a file of an earlier render that this one has not (a Secret, another target's workload) would
    # still be applied with the folder: remove it (only names this command writes)
    for name in sorted({n for target_files in FILES.values() for n in target_files} - set(files)):
        if (out / name).is_file():
            (out / name).unlink()
            print(f"removed {out / name} (not part of this render)")
    print(f"apply with: kubectl apply -f {out}")
    return written


def main(argv: list[str] | None = None) -> None:
    """`steerserve deploy render ...` as a standalone command (`python -m steerserve.deploy.render`)."""
    parser = argparse.ArgumentParser(prog="steerserve deploy render", description=__doc__.splitlines()[0])
    add_render_args(parser)
    run_render(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
