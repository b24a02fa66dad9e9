"""The engine side of the steer interface: what a steer runs inside vLLM's worker processes.

A steer whose plan changes the forward pass names its engine (`Steer.engine`, a module path whose
`ENGINE` is a `SteerEngine`). The engine is loaded lazily, in the worker only, so the request side
stays torch-free. Per model instance one `StepHandle` holds the engines and the current `Step`:

1. `install(model, handle)` once, after vLLM built the model (and `load_weights` after the base
   weights loaded): swap the modules the engine serves, build sub-models, keep install-time state
   on the modules or in `handle.resources[engine.name]` (an engine object is shared by every
   model instance of the process and holds no state). After each of vLLM's dummy runs (memory
   profile, compile warm-up) `warm_up` readies what the steps will run (compiled sub-models).
2. Every forward step the runner hook (`adapter/runner.py`) reads each request's plan and token rows
   and calls `handle.begin(...)`; each engine's `build_step(entries, shape, handle)` turns its
   requests into that step's state (None: nothing to do this step). The step lives on the handle
   until the next step begins (`compute_logits` runs after the forward).
3. The steerable model calls the hooks of the engines with work in the step: `ffn_` (the FFN
   coefficients, the input of `down_proj`, per layer), `residual_` (the residual stream after
   each decoder layer), `attention_` (after the attention kernel, per layer), `after_forward`
   (once, with the forward's output), `replace_logits` / `edit_logits` (`compute_logits`). A step
   without steered rows is None: the plain path, no steering work.

4. Graph mode (engine setting `graph_safe_steps`): engines with a graph-safe form (`make_buffers`)
   keep persistent fixed-capacity buffers; `begin` fills them in place every step (clears them
   on unsteered steps) and their fixed ops (`ffn_fixed_`, the mixing sites' routing) run every
   step, reading only the buffers. A step over a buffer's capacity runs that steer eagerly.

No module globals carry per-step state: layers reach the step through the handle they were given
at install (`handle.step`), and registered ops (which take no Python objects) through the handle's
index in `HANDLES`, an install-time table.

Torch, no vLLM: the engines' vLLM surfaces live in `patches/adapter/`.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

import torch

from .base import SETTINGS_KEY

logger = logging.getLogger("steerserve")

HOOKS = ("ffn_", "residual_", "attention_", "after_forward", "replace_logits", "edit_logits")


class RequestRows(NamedTuple):
    """One request's place in a step: `index` in the batch (its row in the attention metadata and
    among the sampled rows), its token rows [start, end) of the flattened batch, its id, the
    engine's prompt length (None when unknown) and the position of its first token row (the
    tokens it had computed before this step: row `start + j` is at position `first_position + j`,
    a prompt token when that is below `num_prompt_tokens`)."""

    index: int
    start: int
    end: int
    req_id: str = ""
    num_prompt_tokens: int | None = None
    first_position: int = 0


@dataclass(frozen=True)
class StepShape:
    """The step: its requests, token rows and device; `attention_metadata()` gives the step's
    attention metadata per attention layer name (the runner adapter's; valid during the step)."""

    num_reqs: int
    num_tokens: int
    device: torch.device | str = "cpu"
    attention_metadata: Callable[[], dict[str, Any]] | None = None


@dataclass
class AttentionCall:
    """One attention layer's call, as an `attention_` hook sees it after the kernel wrote `output`
    ([N, local heads, D]). `reader()` gives the paged-KV reader of this layer's cache layout (built
    on first use); `unsupported` is why steering cannot run on this backend (None: it can)."""

    layer: int
    query: torch.Tensor
    output: torch.Tensor
    kv_cache: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    scale: float
    head_offset: int
    reader: Callable[[], Any]
    unsupported: str | None = None


class SteerEngine:
    """One steer's engine. Subclasses set `name` (the steer's wire name) and implement
    `build_step` and the hooks they serve; a hook not overridden is never called."""

    name: ClassVar[str]
    settings_keys: ClassVar[tuple[str, ...]] = ()  # the engine settings it reads (others are refused)

    def install(self, model: torch.nn.Module, handle: StepHandle) -> None:
        """After vLLM built `model` (before weights load). Idempotent."""

    def build_kernels(self) -> list[Path]:
        """Compile this engine's native kernels for this machine (`steerserve build-kernels`, run by
        set-up); returns the built libraries. Raises RuntimeError saying why one cannot be built."""
        return []

    def load_weights(self, model: torch.nn.Module, handle: StepHandle, load: Callable) -> set[str]:
        """After the base weights loaded; `load` is the base class's `load_weights`. Returns the
        parameter names it loaded."""
        return set()

    def build_step(self, entries: list[tuple[Any, RequestRows]], shape: StepShape, handle: StepHandle) -> Any | None:
        """This step's state from (plan, rows) of every request carrying this steer, or None."""
        raise NotImplementedError

    def warm_up(self, model: torch.nn.Module, handle: StepHandle, input_ids: torch.Tensor,
                positions: torch.Tensor) -> None:
        """After each of vLLM's dummy runs (memory profile, compile warm-up, graph capture; no
        requests; `input_ids` / `positions`: the dummy run's token rows): prepare what this engine's
        steps will run (compile its sub-models), so that the first steered request does not wait."""

    # --- graph-safe steps (engines that have them) -----------------------------------------------
    def make_buffers(self, model: torch.nn.Module, handle: StepHandle) -> Any | None:
        """In graph mode (`handle.graph_safe`): this engine's persistent step buffers, whose
        `fill_(entries) -> bool` writes a step's steering in place (False: over capacity, the step
        runs on the eager path), or None when the engine has no graph-safe form."""
        return None

    def ffn_fixed_(self, buffers: Any, x: torch.Tensor, layer: int) -> None:
        """The graph-safe FFN op: runs every step in graph mode, reading only `buffers`."""

    def residual_fixed_(self, buffers: Any, hidden: torch.Tensor, layer: int) -> None:
        """The graph-safe residual op: runs every step in graph mode, reading only `buffers`."""

    # --- hooks (called only with this engine's non-None state) ----------------------------------
    def ffn_(self, state: Any, x: torch.Tensor, layer: int) -> None:
        """Rewrite the FFN coefficients x ([num_tokens, d_ffn / tp]) of `layer` in place."""

    def residual_(self, state: Any, hidden: torch.Tensor, layer: int) -> None:
        """Add to the residual stream after decoder `layer` in place: `hidden` ([num_tokens, hidden
        size]) is the layer's output: the `hidden_states` half of a split stream (whose sum with
        the residual half the next layer forms) or the whole stream."""

    def attention_(self, state: Any, call: AttentionCall) -> None:
        """Overwrite rows of `call.output` after the attention kernel."""

    def after_forward(self, state: Any, model: torch.nn.Module, out: torch.Tensor, input_ids: torch.Tensor | None,
                      positions: torch.Tensor | None) -> Any:
        """After the forward (`out`: its hidden states); returns the state `compute_logits` sees."""
        return state

    def replace_logits(self, state: Any, model: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits computed instead of the base's (None: compute the base's)."""
        return None

    def edit_logits(self, state: Any, model: torch.nn.Module, hidden_states: torch.Tensor,
                    logits: torch.Tensor) -> torch.Tensor:
        """The logits after this steer (may edit `logits` in place or return a new tensor)."""
        return logits

    @classmethod
    def serves(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(SteerEngine, hook)


@dataclass
class Step:
    """One forward step's steering: per engine with work, its state; per hook, the engines that
    serve it, in registry order."""

    shape: StepShape
    states: dict[str, Any] = field(default_factory=dict)
    hooks: dict[str, list[SteerEngine]] = field(default_factory=dict)

    def state(self, name: str) -> Any:
        return self.states.get(name)

    def calls(self, hook: str) -> list[tuple[SteerEngine, Any]]:
        """(engine, its current state) for the engines serving `hook`."""
        return [(engine, self.states.get(engine.name)) for engine in self.hooks.get(hook, ())]


HANDLES: list[StepHandle] = []  # install-time table: a handle's index, for registered ops


def engine_settings(vllm_config: Any) -> dict:
    """The engines' settings the server passed through vLLM's `--additional-config`
    ({"steerserve": {...}}: full variants, proxy pairs, graph-safe steps)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    return dict(extra.get(SETTINGS_KEY) or {}) if isinstance(extra, dict) else {}


class StepHandle:
    """A model instance's engines and its current step (worker process). `settings`: the engines'
    settings (`engine_settings`); with `settings["graph_safe_steps"]` the engines that have a
    graph-safe form keep persistent step buffers and run their fixed ops every step."""

    def __init__(self, engines: tuple[SteerEngine, ...], settings: dict | None = None):
        self.engines = engines
        self.settings = dict(settings or {})
        known = {"graph_safe_steps", *(key for e in engines for key in e.settings_keys)}
        unknown = sorted(set(self.settings) - known)
        if unknown:
            raise ValueError(f"unknown steerserve engine setting(s) {unknown}; known: {sorted(known)}")
        self.graph_safe = bool(self.settings.get("graph_safe_steps"))
        self.buffers: dict[str, Any] = {}  # engine name -> its persistent step buffers (graph mode)
        self.fixed_ffn: list[tuple[SteerEngine, Any]] = []  # (engine, buffers) of graph-safe FFN ops
        self.fixed_residual: list[tuple[SteerEngine, Any]] = []  # ... and of graph-safe residual ops
        self._buffers_dirty = False
        self._overflow_logged: set[str] = set()
        self.buffer_served: set[str] = set()  # engines whose buffers serve the current step
        # steps begun, and per engine the steps its graph-safe op / its eager state served
        self.stats: dict[str, Any] = {"steps": 0, "graph_safe": {}, "eager": {}}
        self.step: Step | None = None
        self.shards: tuple[Callable[[torch.Tensor], torch.Tensor], int] | None = None  # set for TP
        self.refused: set[str] = set()  # requests whose plan was refused (logged once each)
        self.modules: list[torch.nn.Module] = []  # modules registered ops reach by index
        self.resources: dict[str, Any] = {}  # engine name -> its install-time state (engines are stateless)
        self.index = len(HANDLES)
        HANDLES.append(self)

    @classmethod
    def for_registry(cls, settings: dict | None = None) -> StepHandle:
        """A handle with the engine of every registered steer that has one."""
        from . import STEERS

        engines = []
        for steer in STEERS:
            if steer.engine:
                engines.append(importlib.import_module(steer.engine).ENGINE)
        return cls(tuple(engines), settings)

    def install(self, model: torch.nn.Module) -> None:
        for engine in self.engines:
            engine.install(model, self)
            if self.graph_safe and (buffers := engine.make_buffers(model, self)) is not None:
                self.buffers[engine.name] = buffers
                if type(engine).serves("ffn_fixed_"):
                    self.fixed_ffn.append((engine, buffers))
                if type(engine).serves("residual_fixed_"):
                    self.fixed_residual.append((engine, buffers))

    def load_weights(self, model: torch.nn.Module, load: Callable) -> set[str]:
        loaded: set[str] = set()
        for engine in self.engines:
            loaded |= engine.load_weights(model, self, load)
        return loaded

    def begin(self, plans: list[tuple[Any, RequestRows]], shape: StepShape) -> Step | None:
        """Start a step: (SteerPlan, rows) per steered request. Sets and returns `self.step` (None
        when no engine has work)."""
        self.step = None
        self.buffer_served = set()
        if not plans:
            self.clear_buffers()
            return None
        step = Step(shape)
        for engine in self.engines:
            entries = [(getattr(plan, engine.name), rows) for plan, rows in plans
                       if getattr(plan, engine.name, None) is not None]
            buffers = self.buffers.get(engine.name)
            if buffers is not None:
                self._buffers_dirty = True
                if buffers.fill_(entries):
                    if entries:
                        self._count("graph_safe", engine.name)
                        self.buffer_served.add(engine.name)
                else:
                    buffers.fill_([])
                    if engine.name not in self._overflow_logged:
                        self._overflow_logged.add(engine.name)
                        logger.warning("steerserve: %s: a step exceeded the graph-safe buffers' capacity; such steps "
                                       "run on the eager path (logged once)", engine.name)
            if not entries:
                continue
            state = engine.build_step(entries, shape, self)
            if state is None:
                continue
            step.states[engine.name] = state
            if engine.name not in self.buffer_served:
                self._count("eager", engine.name)
            for hook in HOOKS:
                if type(engine).serves(hook):
                    step.hooks.setdefault(hook, []).append(engine)
        self.stats["steps"] += 1
        if not step.states:
            return None
        self.step = step
        return step

    def _count(self, kind: str, name: str) -> None:
        self.stats[kind][name] = self.stats[kind].get(name, 0) + 1

    def end(self) -> None:
        """Forget the step (the next one begins with `begin`)."""
        self.step = None

    def clear_buffers(self) -> None:
        """A step without steering: the graph-safe buffers hold none (written only when they did)."""
        if self._buffers_dirty:
            for buffers in self.buffers.values():
                buffers.fill_([])
            self._buffers_dirty = False

    def calls(self, hook: str) -> list[tuple[SteerEngine, Any]]:
        step = self.step
        return step.calls(hook) if step is not None else []

    def warm_up(self, model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """vLLM ran a dummy pass (no requests) on these token rows: each engine warms up."""
        for engine in self.engines:
            engine.warm_up(model, self, input_ids, positions)

    # --- what the steerable model calls -------------------------------------------------------
    def after_forward(self, model: torch.nn.Module, out: Any, input_ids, positions) -> None:
        """`out`: the forward's hidden states, cut to the step's token rows."""
        step = self.step
        if step is None or not isinstance(out, torch.Tensor):
            return
        for engine, state in step.calls("after_forward"):
            try:
                step.states[engine.name] = engine.after_forward(state, model, out, input_ids, positions)
            except Exception:  # noqa: BLE001 - never take the engine (and every request) down
                logger.exception("steerserve: %s: the after-forward step failed; this step's %s requests are "
                                 "served without it", engine.name, engine.name)
                step.states[engine.name] = None

    def compute_logits(self, model: torch.nn.Module, hidden_states: torch.Tensor, base: Callable) -> Any:
        """Logits for `hidden_states`: an engine's replacement or `base(hidden_states)`, then each
        engine's edits."""
        logits = replaced_by = None
        for engine, state in self.calls("replace_logits"):
            if state is not None and (logits := engine.replace_logits(state, model, hidden_states)) is not None:
                replaced_by = engine
                break
        if logits is None:
            logits = base(hidden_states)
        if logits is None:
            return None
        for engine, state in self.calls("edit_logits"):
            if state is not None and engine is not replaced_by:  # its replacement is already its edit
                logits = engine.edit_logits(state, model, hidden_states, logits)
        return logits


def handle_stats(model: torch.nn.Module) -> dict:
    """The model's steering counters (for `LLM.apply_model`): steps begun with steered requests,
    and per steer the steps its graph-safe op and its eager state served; whether graph mode is on."""
    handle = model.steer_handle
    return {**handle.stats, "graph_safe_steps": handle.graph_safe, "buffers": sorted(handle.buffers)}


def _layer_hook_point(kind: str):
    """A per-layer hook point: its eager body, its registered op and what the layers call.

    The body runs the graph-safe ops (every step in graph mode: `handle.fixed_<kind>`, each
    engine's `<kind>_fixed_`), then the step's `<kind>_` hooks. The registered op
    `steerserve::<kind>_steer_` is opaque to torch.compile, so a compiled graph calls it every step
    and its Python body reads that step's state (a Python branch on the step would be traced once,
    with no step, and never run again). Layers call the op under torch.compile, else the body
    (without the dispatcher's per-call cost on every layer of every eager step), and skip both
    when the step has no steering and no graph-safe op is installed."""
    fixed_attr, fixed_method, hook = f"fixed_{kind}", f"{kind}_fixed_", f"{kind}_"

    def body(x: torch.Tensor, handle: int, layer: int) -> None:
        h = HANDLES[handle]
        for engine, buffers in getattr(h, fixed_attr):
            getattr(engine, fixed_method)(buffers, x, layer)
        step = h.step
        if step is None:
            return
        for engine, state in step.calls(hook):
            getattr(engine, hook)(state, x, layer)

    op = torch.library.custom_op(f"steerserve::{kind}_steer_", body, mutates_args=("x",))

    @op.register_fake
    def _(x: torch.Tensor, handle: int, layer: int) -> None:
        return None

    def call(x: torch.Tensor, handle: int, layer: int) -> None:
        if torch.compiler.is_compiling():
            op(x, handle, layer)
        elif HANDLES[handle].step is not None or getattr(HANDLES[handle], fixed_attr):
            body(x, handle, layer)

    return body, op, call


# the FFN coefficients (the input of down_proj, per layer): steerable MLPs call `ffn_steer`
ffn_hook, ffn_steer_, ffn_steer = _layer_hook_point("ffn")
# the residual stream after each decoder layer: steerable decoder layers call `residual_steer`
residual_hook, residual_steer_, residual_steer = _layer_hook_point("residual")


def slice_offset(hidden_states: torch.Tensor, step_hidden: torch.Tensor) -> int | None:
    """The first token row of `hidden_states` in the step's hidden states when it is a row slice of
    them (vLLM's prompt-logprobs path passes such slices to `compute_logits`), else None (a gathered
    copy: the sampled rows)."""
    h = step_hidden
    if not (hidden_states.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
            and hidden_states.dim() == 2 and h.dim() == 2 and hidden_states.stride() == h.stride()):
        return None
    return (hidden_states.data_ptr() - h.data_ptr()) // (h.element_size() * h.stride(0))
