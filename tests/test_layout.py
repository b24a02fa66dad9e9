"""The code's layout rules (issue 15): the client imports neither torch nor vLLM, the engine plugin
imports nothing from the API server, steerserve's modules import each other without cycles, and
every registered steer is in the request schema, the plan and the client builder by construction."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"server": "steerserve.server", "patches": "steerserve.patches", "clients": "steerserve.clients",
            "training": "steerserve.training", "deploy": "steerserve.deploy"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """steerserve modules `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_client_builder_imports_neither_torch_nor_vllm():
    code = ("import sys; from steerserve.clients import Steer; "
            "s = Steer().infosteer(alpha=1.5).mixing('taia').proxy(alpha=0.5).context_indicator(); s.extra_body(); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm', 'transformers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_engine_plugin_imports_nothing_from_the_api_server():
    modules = _modules()
    offenders = {name: sorted(t for t in _imports(name, path, modules) if t.startswith("steerserve.server"))
                 for name, path in modules.items() if name.startswith("steerserve.patches")}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how a package is assembled, not a cycle
    edges = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_every_registered_steer_is_in_the_schema_the_plan_and_the_client():
    from steerserve.clients import Steer
    from steerserve.patches.plan import SteerPlan
    from steerserve.patches.steers import STEERS
    from steerserve.server.schema import SteerSpec, parse_spec

    examples = {"infosteer": dict(alpha=1.5), "context_attention": dict(alpha=0.5), "mixing": dict(mode="taia"),
                "proxy": dict(alpha=0.5), "context_indicator": {}, "vectors": ({"name": "joy", "scale": 0.5},)}
    for steer in STEERS:
        assert steer.name in SteerSpec.model_fields and steer.name in SteerPlan.__dataclass_fields__
        example = examples[steer.name]
        build = getattr(Steer(), steer.name)
        body = (build(*example) if isinstance(example, tuple) else build(**example)).to_dict()
        assert getattr(parse_spec(body), steer.name) is not None, steer.name
        if steer.item:  # a list steer: its item method appends one item
            item = getattr(Steer(), steer.item)(**example[0])
            assert getattr(item, steer.item)(**example[0]).to_dict()[steer.name] == 2 * body[steer.name]
    assert set(examples) == {s.name for s in STEERS}, "add an example for the new steer here"


def test_docs_client_example_runs():
    """docs/steering.md's Python client example builds its steer object as written (no server)."""
    import re

    text = (ROOT / "docs" / "steering.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "Steer()" in b]
    out = subprocess.run([sys.executable, "-c", block + "\nassert body['steer']['mixing'] == 'taia'"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_vllm_is_reached_only_through_the_adapter():
    """Steer packages (request side and engines) never import vLLM: its private surfaces live in
    patches/adapter/ (checked by tests/engine/test_vllm_adapter.py); the plugin entry point and the
    steerable model classes are the only other places that name it."""
    allowed = {"steerserve.patches", "steerserve.patches.models"}
    offenders = sorted(name for name, path in _modules().items()
                       if name.startswith("steerserve.patches") and not name.startswith("steerserve.patches.adapter")
                       and name not in allowed and "vllm" in _third_party_imports(path))
    assert not offenders, offenders


def test_every_engine_steer_has_its_engine():
    """A steer that names an engine has it (`ENGINE`, a SteerEngine of the same name)."""
    import importlib

    from steerserve.patches.steers import STEERS
    from steerserve.patches.steers.engine import SteerEngine

    for steer in STEERS:
        if steer.engine:
            engine = importlib.import_module(steer.engine).ENGINE
            assert isinstance(engine, SteerEngine) and engine.name == steer.name, steer.name


def test_the_wheel_carries_every_package():
    """pyproject.toml lists every package folder (setuptools maps folders onto `steerserve.*` and
    does not find subpackages by itself: a missing one is absent from the wheel the Dockerfiles
    install)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join([package, *path.parent.relative_to(ROOT / folder).parts])
               for folder, package in PACKAGES.items() for path in (ROOT / folder).rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)
