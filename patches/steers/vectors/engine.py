"""The steering vectors' engine: the served vectors on the device, and per step one table of the
step's distinct configurations indexed per token row (as multi-LoRA and vLLM's own steering do).

A configuration is the set of terms that applies to a token: a request's terms whose `positions`
cover the token (prompt tokens: position < the prompt length). Its dense form is
`sum(scale * direction[layer])` per layer (float32, zeros on layers it does not steer), cached per
configuration. Per step the table `[num_layers, configs, hidden]` (the model's dtype) stacks the
step's configurations; on each layer one gather and one `index_add_` add every steered row's
vector, whatever the number of distinct configurations (a single configuration over one
contiguous span of rows, such as a batch that all shares one vector, is one broadcast add).
Unsteered rows are never touched; a steered configuration that skips a layer adds zeros there.

Graph mode (`graph_safe_steps`): persistent buffers (a slot per configuration, a slot per token
row, slot 0 all zeros) filled in place every step, and a fixed op that gathers and adds for every
row of every layer (unsteered rows add +0.0).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..engine import RequestRows, SteerEngine, StepHandle, StepShape
from . import VECTORS_SETTING, VectorsPlan, VectorTerm
from .files import read_directions

logger = logging.getLogger("steerserve")

Config = tuple[VectorTerm, ...]
CACHE_CONFIGS = 512  # dense configurations kept on the device between steps
DEFAULT_GRAPH_CONFIGS = 32  # graph mode: distinct configurations per step


def split_rows(terms: tuple[VectorTerm, ...], rows: RequestRows) -> list[tuple[Config, int, int]]:
    """(configuration, start, end) of a request's token rows this step: its prompt rows get the
    terms at positions "all"/"prompt", its generated rows those at "all"/"generated"."""
    n_prompt = rows.num_prompt_tokens
    if n_prompt is None:  # unknown prompt length: every row is a prompt row
        n_prompt = rows.first_position + (rows.end - rows.start)
    cut = rows.start + max(0, min(rows.end - rows.start, n_prompt - rows.first_position))
    out = []
    for phase, start, end in (("prompt", rows.start, cut), ("generated", cut, rows.end)):
        if end <= start:
            continue
        config = tuple(t for t in terms if t.positions in ("all", phase))
        if config:
            out.append((config, start, end))
    return out


@dataclass
class VectorStep:
    """One step's work: per layer the table rows to add (`table[layer]`: [configs, hidden])."""

    table: torch.Tensor  # [num_layers, configs, hidden], the model's dtype
    layers: frozenset[int]  # layers some configuration steers
    rows: torch.Tensor  # [n] int64 token rows
    slots: torch.Tensor  # [n] int64 configuration per row
    span: tuple[int, int] | None = None  # one configuration over one contiguous span of rows

    def apply_(self, hidden: torch.Tensor, layer: int) -> None:
        if layer not in self.layers:
            return
        if self.span is not None:
            hidden[self.span[0]:self.span[1]] += self.table[layer, 0]
        else:
            hidden.index_add_(0, self.rows, self.table[layer].index_select(0, self.slots))


class VectorBuffers:
    """Graph mode: `slot_of_row[token]` (0 = unsteered) and `table[layer, slot]`, filled in place."""

    def __init__(self, store: VectorStore, tokens: int, slots: int) -> None:
        self.store = store
        self.capacity_tokens = tokens
        self.slot_of_row = torch.zeros(tokens, dtype=torch.long, device=store.device)
        self.table = torch.zeros(store.num_layers, slots + 1, store.hidden_size, dtype=store.dtype,
                                 device=store.device)
        self.keys: list[Config | None] = [None] * (slots + 1)  # what each slot holds (slot 0: zeros)
        self._used = 0  # rows written last step (cleared before the next fill)

    def fill_(self, entries: list[tuple[VectorsPlan, RequestRows]]) -> bool:
        if self._used:
            self.slot_of_row[: self._used].zero_()
            self._used = 0
        if not entries:
            return True
        pieces, configs = self.store.pieces(entries)
        end = max((e for _, _, e in pieces), default=0)
        if len(configs) > len(self.keys) - 1 or end > self.capacity_tokens:
            return False
        slot_of = {k: i for i, k in enumerate(self.keys) if k is not None and k in configs}
        free = [i for i in range(1, len(self.keys)) if self.keys[i] not in configs]
        for config in configs:
            if config not in slot_of:
                slot = free.pop(0)
                self.table[:, slot].copy_(self.store.dense(config))
                self.keys[slot] = config
                slot_of[config] = slot
        for config, start, stop in pieces:
            self.slot_of_row[start:stop] = slot_of[config]
        self._used = end
        return True

    def apply_(self, hidden: torch.Tensor, layer: int) -> None:
        vectors_fixed_(hidden, self.table[layer], self.slot_of_row)


def vectors_fixed_(hidden: torch.Tensor, table: torch.Tensor, slot_of_row: torch.Tensor) -> None:
    """The graph-safe op of one layer: every row adds its slot's vector (`table`: [slots, hidden],
    slot 0 zeros); the same two kernels whatever the buffers hold."""
    hidden += table.index_select(0, slot_of_row[: hidden.shape[0]])


class VectorStore:
    """A model instance's vectors on the device (`handle.resources["vectors"]`), the dense form of
    the configurations steps used (cached) and the last step's table."""

    def __init__(self, num_layers: int, hidden_size: int, dtype: torch.dtype, device: torch.device | str,
                 vectors: dict[str, torch.Tensor] | None = None) -> None:
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        # name -> [num_layers, hidden] float32 on the device (zeros on layers the vector lacks)
        self.vectors: dict[str, torch.Tensor] = {k: v.to(device, torch.float32) for k, v in (vectors or {}).items()}
        self._dense: OrderedDict[Config, torch.Tensor] = OrderedDict()
        self.table_key: tuple | None = None
        self.table: torch.Tensor | None = None
        self.missing: set[str] = set()  # requests naming vectors not loaded here (logged once each)

    @classmethod
    def for_model(cls, model: torch.nn.Module, items: list[dict]) -> VectorStore:
        """The vectors of the engine setting (`[{"name", "path"}]`) for a vLLM model."""
        config = model.steer_vllm_config.model_config
        text = config.hf_text_config
        num_layers, hidden = int(text.num_hidden_layers), int(text.hidden_size)
        vectors = {}
        for item in items:
            _, directions, _ = read_directions(item["path"])
            dense = torch.zeros(num_layers, hidden, dtype=torch.float32)
            for layer, d in directions.items():
                if layer >= num_layers or d.shape[0] != hidden:
                    raise ValueError(f"steering vector {item['name']!r} ({item['path']}): direction.{layer} does not "
                                     f"fit the model ({num_layers} layers, hidden size {hidden})")
                dense[layer] = torch.from_numpy(d)
            vectors[item["name"]] = dense
        return cls(num_layers, hidden, config.dtype, next(model.parameters()).device, vectors)

    def dense(self, config: Config) -> torch.Tensor:
        """The configuration's per-layer sum of scale * direction (summed in float32, then the
        model's dtype; [num_layers, hidden]), cached."""
        out = self._dense.get(config)
        if out is not None:
            self._dense.move_to_end(config)
            return out
        acc = torch.zeros(self.num_layers, self.hidden_size, dtype=torch.float32, device=self.device)
        for term in config:
            idx = torch.tensor(term.layers, dtype=torch.long, device=self.device)
            acc.index_add_(0, idx, self.vectors[term.name].index_select(0, idx) * term.scale)
        out = acc.to(self.dtype)
        self._dense[config] = out
        if len(self._dense) > CACHE_CONFIGS:
            self._dense.popitem(last=False)
        return out

    def pieces(self, entries: list[tuple[VectorsPlan, RequestRows]]
               ) -> tuple[list[tuple[Config, int, int]], list[Config]]:
        """The step's (configuration, start, end) row ranges (`split_rows` of each request whose
        vectors are loaded here) and its distinct configurations, in order of appearance."""
        pieces = [p for plan, rows in entries if self.known(plan, rows) for p in split_rows(plan.terms, rows)]
        return pieces, list(dict.fromkeys(c for c, _, _ in pieces))

    def known(self, plan: VectorsPlan, rows: RequestRows) -> bool:
        missing = [t.name for t in plan.terms if t.name not in self.vectors]
        if missing and rows.req_id not in self.missing:
            if len(self.missing) > 4096:
                self.missing.clear()
            self.missing.add(rows.req_id)
            logger.error("steerserve: request %s names steering vectors %s this engine did not load; running it "
                         "without them", rows.req_id, missing)
        return not missing


class VectorEngine(SteerEngine):
    name = "vectors"
    settings_keys = (VECTORS_SETTING, "graph_vector_configs")

    def install(self, model: torch.nn.Module, handle: StepHandle) -> None:
        handle.resources[self.name] = VectorStore.for_model(model, handle.settings.get(VECTORS_SETTING) or [])

    # --- graph mode --------------------------------------------------------------------------
    def make_buffers(self, model, handle: StepHandle) -> VectorBuffers | None:
        store: VectorStore = handle.resources[self.name]
        if not store.vectors:
            return None
        sched = model.steer_vllm_config.scheduler_config
        slots = int(handle.settings.get("graph_vector_configs", DEFAULT_GRAPH_CONFIGS))
        return VectorBuffers(store, int(sched.max_num_batched_tokens), slots)

    def residual_fixed_(self, buffers: VectorBuffers, hidden: torch.Tensor, layer: int) -> None:
        buffers.apply_(hidden, layer)

    # --- eager steps -------------------------------------------------------------------------
    def build_step(self, entries, shape: StepShape, handle: StepHandle) -> VectorStep | None:
        if self.name in handle.buffer_served:
            return None
        store: VectorStore = handle.resources[self.name]
        pieces, configs = store.pieces(entries)
        if not pieces:
            return None
        key = tuple(configs)
        if key != store.table_key:  # decode steps usually repeat the last step's configurations
            store.table = torch.stack([store.dense(c) for c in configs], dim=1)  # [layers, configs, hidden]
            store.table_key = key
        slot = {c: i for i, c in enumerate(configs)}
        layers = frozenset(layer for c in configs for t in c for layer in t.layers)
        contiguous = all(pieces[i][2] == pieces[i + 1][1] for i in range(len(pieces) - 1))
        if len(configs) == 1 and contiguous:
            empty = torch.empty(0, dtype=torch.long)
            return VectorStep(store.table, layers, empty, empty, (pieces[0][1], pieces[-1][2]))
        rows = torch.cat([torch.arange(s, e, dtype=torch.long) for _, s, e in pieces])
        slots = torch.repeat_interleave(torch.tensor([slot[c] for c, _, _ in pieces], dtype=torch.long),
                                        torch.tensor([e - s for _, s, e in pieces]))
        return VectorStep(store.table, layers, rows.to(store.device, non_blocking=True),
                          slots.to(store.device, non_blocking=True))

    def residual_(self, state: VectorStep, hidden: torch.Tensor, layer: int) -> None:
        state.apply_(hidden, layer)


ENGINE = VectorEngine()
