"""The steer interface: what each steer defines once, and what the request path derives from it.

A steer is one package under `patches/steers/` whose `STEER` object is a `Steer`: its wire name,
its pydantic `Spec` (the schema of `steer.<name>`, which also feeds `SteerSpec`, /openapi.json and
the client builder), its frozen `Plan`, whether its plan salts the prefix cache, and `normalise`
(spec + what is served -> plan, or None when the spec does nothing; a `SteerError` names the
field). The registry (`patches/steers/__init__.py`) lists the steers once; the request schema,
plan parsing, the echo, metrics labels and the client builder loop over it.

Torch-free and vLLM-free: imported by the API server, the engine's workers and the Python client.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Awaitable, Callable, ClassVar, Mapping

from pydantic import BaseModel


ECHO_CAP = 200  # characters of a client's value an error message repeats
# The engines' settings travel as vLLM's `additional_config[SETTINGS_KEY]` (`--additional-config`),
# which vLLM hands every worker in its `VllmConfig`: full variants, proxy pairs, graph-safe steps.
SETTINGS_KEY = "steerserve"


def shown(value: object, cap: int = ECHO_CAP) -> str:
    """`repr(value)` for an error message, cut to `cap` characters (a 1 MB name is not echoed back)."""
    text = repr(value)
    if len(text) <= cap:
        return text
    return f"{text[:cap]}... ({len(text)} characters)"


class SteerError(ValueError):
    """A bad `steer` value; `field` is the dotted path from the request body."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about the served model."""

    architecture: str
    num_layers: int
    ffn_width: int
    ffn_steerable: bool
    tensor_parallel_size: int = 1
    num_heads: int = 0  # attention heads per layer (global, all ranks)
    attention_steerable: bool = False
    attention_unsupported_reason: str = ""
    hidden_size: int = 0  # the residual stream's width
    # steer -> why it is refused on this model (its architecture, or its checkpoint's attention)
    refused: tuple[tuple[str, str], ...] = ()

    def refusal(self, steer: str) -> str | None:
        """Why `steer` cannot run on this model (None: it can, as far as the model goes)."""
        if not self.ffn_steerable:
            from steerserve.patches.architectures import unsupported

            return unsupported(self.architecture)
        return dict(self.refused).get(steer)

    @classmethod
    def from_checkpoint(cls, model_dir, steerable: bool | None = None) -> ModelInfo:
        """Read from a checkpoint's config.json (steerable: whether the plugin has its architecture)."""
        import json
        from pathlib import Path

        from steerserve.patches.architectures import architecture

        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        arch = (cfg.get("architectures") or ["unknown"])[0]
        text = cfg if "num_hidden_layers" in cfg else cfg.get("text_config", {})
        if steerable is None:
            steerable = architecture(arch) is not None
        return cls.from_config(arch, text, steerable)

    @classmethod
    def from_config(cls, arch: str, text: dict, steerable: bool, tensor_parallel_size: int = 1) -> ModelInfo:
        """From a (text) model config as a dict."""
        from steerserve.patches.architectures import refusals, unsupported

        refused = refusals(arch, text) if steerable else {}
        reason = unsupported(arch) if not steerable else refused.get("context_attention", "")
        return cls(
            arch, int(text.get("num_hidden_layers", 0)), int(text.get("intermediate_size") or 0), steerable,
            tensor_parallel_size, int(text.get("num_attention_heads") or 0), steerable and not reason, reason,
            int(text.get("hidden_size") or 0), tuple(sorted(refused.items())),
        )


@dataclass(frozen=True)
class ServingContext:
    """What a steer's `normalise` may consult: the served model, the head sets the server loaded,
    the route (`"chat"` or `"completions"`), the request's `model`, and the served family (tuned
    variants, proxy pairs, steering vectors, context indicators: a `server.family.Family`,
    duck-typed here)."""

    info: ModelInfo
    head_sets: Mapping[str, Any] = field(default_factory=dict)
    endpoint: str = "chat"
    model: str | None = None
    family: Any = None


@dataclass(frozen=True)
class Prepared:
    """What a steer's request preparation leaves for later: `pending`, state that `on_render`
    completes once vLLM rendered the prompt (None: nothing to complete), and `response_model`, the
    `model` to answer with when the request was routed to another served name."""

    pending: Any = None
    response_model: str | None = None


@dataclass(frozen=True)
class RenderedPrompt:
    """The prompt vLLM rendered for a request (API server): `kind` "chat" or "completions", the
    engine's prompt token ids, the rendered text (chat), the renderer's tokenizer, the conversation
    as the chat template saw it, the (prepared) request, and `render_messages(messages)`, which
    renders other messages with the request's template and returns the text (chat only)."""

    kind: str
    token_ids: list[int]
    text: str | None
    tokenizer: Any
    conversation: Any
    request: Any
    render_messages: Callable[[list], Awaitable[str]] | None = None


def canonical_numbers(plan: object) -> None:
    """Make a frozen plan's numbers canonical in place: fields declared `float` hold floats, and
    -0.0 is 0.0 (so equal plans have one JSON form, one fingerprint and one cache salt)."""
    for f in fields(plan):
        value = getattr(plan, f.name)
        if f.type == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            object.__setattr__(plan, f.name, float(value) + 0.0)  # -0.0 + 0.0 == +0.0


class Steer:
    """One steer, defined once. Subclasses set the class attributes and implement `normalise`.

    name         the wire key (`steer.<name>`), the echo's `"steer"` and the metrics label
    Spec         the pydantic wire schema of `steer.<name>` (or a union/scalar type for steers whose
                 value is not an object: override `spec_type`)
    Plan         the frozen plan dataclass the engine reads (`SteerPlan.<name>`)
    salts_cache  whether the plan changes the KV a prompt produces (the prefix cache is salted with
                 the plan's fingerprint when any applied steer says so)
    implied_by_model  whether the request's `model` alone can imply it (then `normalise` also
                 runs when the request has no `steer.<name>`, with spec None)
    hints        extra words for pydantic's messages, by field name ("" for the value itself)
    summary      one line for /openapi.json and the client builder's docstrings
    item         for a steer whose value is a list: the client builder's method that appends one
                 item (`build_item`), e.g. `Steer().vector(...)` for `steer.vectors`
    engine       the module whose `ENGINE` (a `steers.engine.SteerEngine`) runs the plan in the
                 engine's workers, imported there only; None for steers the API server applies
                 alone (such as the context indicator, which rewrites the prompt)
    reference    the module of its pure-torch reference over Hugging Face models; with a
                 `hooks(model, plans, pads, total_len, prompt_width)` context manager (row r
                 steered by `plans[r]` or not) it joins `patches.reference.steered`
    """

    name: ClassVar[str]
    Spec: ClassVar[Any]
    Plan: ClassVar[type]
    salts_cache: ClassVar[bool] = True
    implied_by_model: ClassVar[bool] = False  # normalise runs without a spec too (spec None)
    hints: ClassVar[dict[str, str]] = {}
    summary: ClassVar[str] = ""
    item: ClassVar[str | None] = None
    engine: ClassVar[str | None] = None
    reference: ClassVar[str | None] = None

    # --- wire schema -----------------------------------------------------------------------
    def spec_type(self) -> Any:
        """The annotation of `SteerSpec.<name>` (None always allowed: no steering)."""
        return self.Spec

    def spec_models(self) -> list[type[BaseModel]]:
        """The pydantic models in this steer's wire type (for unknown-field messages)."""
        spec = self.spec_type()
        members = getattr(spec, "__args__", (spec,))
        return [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]

    def build(self, *args, **fields) -> Any:
        """The client builder's value for `steer.<name>` (JSON-ready), validated with the Spec;
        raises pydantic.ValidationError on values no model accepts."""
        if args:
            raise TypeError(f"Steer().{self.name}() takes keyword arguments: {', '.join(self.Spec.model_fields)}")
        return self.Spec.model_validate(fields).model_dump(exclude_none=True)

    def build_item(self, *args, **fields) -> Any:
        """For list steers (`item` set): one item of the list, validated."""
        raise NotImplementedError

    # --- request path ----------------------------------------------------------------------
    def normalise(self, spec: Any, ctx: ServingContext) -> Any | None:
        """The plan for a validated spec, or None when it does nothing. Raises SteerError."""
        raise NotImplementedError

    def prepare_request(self, request: Any, plan: Any, ctx: ServingContext) -> Prepared | None:
        """API server, before vLLM renders the prompt: adjust the parsed OpenAI request for this
        steer's plan (mutates `request`: its text, messages or model). Raises SteerError."""
        return None

    async def on_render(self, plan: Any, pending: Any, prompt: RenderedPrompt) -> Any:
        """API server, after vLLM rendered the prompt: the plan completed with what only the
        rendered prompt tells (for `pending` from `prepare_request`). Raises SteerError."""
        raise NotImplementedError(f"{self.name} left pending state but has no on_render")

    # --- the plan's serialised form ----------------------------------------------------------
    def plan_from_json(self, body: Any) -> Any:
        return self.Plan(**body)

    def echo(self, plan: Any) -> dict:
        return plan.echo()
