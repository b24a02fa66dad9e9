"""steerserve's HTTP surface, attached to vLLM's own OpenAI server as an endpoint plugin
(entry point group `vllm.endpoint_plugins`, name `steerserve_api`).

It replaces the two generation routes with thin wrappers around vLLM's own handlers: the request
is parsed by vLLM's protocol models (so every OpenAI field, template, streaming and sampling
behaviour is vLLM's), the `steer` field is validated and normalised into a plan, the plan is put on
the request (`vllm_xargs["steer"]`, and the prefix-cache salt), vLLM's handler runs, and the
response gets the `steer` echo (on the first chunk when streaming). Runs in the API server process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from contextvars import ContextVar
from dataclasses import dataclass, replace
from collections.abc import AsyncIterator
from http import HTTPStatus

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import State

from steerserve.patches.plan import EXTRA_ARGS_KEY, SIGNATURE_KEY, SteerPlan, engine_args

from steerserve.patches.steers import BY_NAME
from steerserve.patches.steers.base import RenderedPrompt

from . import auth, family, feedback, limits, metrics
from .experiments import UNIT_HEADER, resolve_experiment
from .profiles import MODEL_SEPARATOR, split_model_name, steer_for_model_name
from .schema import SteerError, normalise, plan_for, resolve_profile, serving_context
from steerserve.patches.adapter.server import (
    engine_input_text, http_surface, intercept_renders, refused_by_vllm_bug, render_chat_text, renderer_tokenizer,
    served_models_listing,
)

_vllm = http_surface()
ChatCompletionRequest = _vllm.ChatCompletionRequest
CompletionRequest = _vllm.CompletionRequest
ErrorResponse = _vllm.ErrorResponse

logger = logging.getLogger("steerserve")

STEER_FIELD = "steer"
_RESPONSES = {
    HTTPStatus.OK.value: {"content": {"text/event-stream": {}}},
    HTTPStatus.BAD_REQUEST.value: {"model": ErrorResponse},
    HTTPStatus.NOT_FOUND.value: {"model": ErrorResponse},
    HTTPStatus.INTERNAL_SERVER_ERROR.value: {"model": ErrorResponse},
}
_STEER_DOC = (
    "steerserve: pass steering as the extra body field `steer` (OpenAI SDK: "
    '`extra_body={"steer": {...}}`); see docs/steering.md for the contract. The response carries a '
    "`steer` echo (first chunk when streaming) when the request had a `steer` field."
)


def error_response(field: str | None, message: str):
    """vLLM's OpenAI error object for a 400 naming `field`."""
    return ErrorResponse(error={"message": message, "type": "BadRequestError", "param": field, "code": 400})


def bad_request(field: str | None, message: str) -> JSONResponse:
    return JSONResponse(content=error_response(field, message).model_dump(), status_code=400)


@dataclass
class RenderJob:
    """Steers waiting for the rendered prompt (`pending`: steer name -> its state from
    `prepare_request`), completed by `_render_hook` when vLLM renders `request`'s prompt."""

    request: object
    plan: SteerPlan
    pending: dict
    resolved: SteerPlan | None = None


# The render job of the request being handled in this task (request-scoped: set around vLLM's
# handler by `rendering`; concurrent requests and comparison arms each run in their own task).
_RENDER_JOB: ContextVar[RenderJob | None] = ContextVar("steerserve_render_job", default=None)


@contextlib.contextmanager
def rendering(applied: Applied | None):
    """Make `applied`'s render job visible to `_render_hook` while vLLM's handler runs."""
    token = _RENDER_JOB.set(applied.render if applied is not None else None)
    try:
        yield
    finally:
        _RENDER_JOB.reset(token)


@dataclass(frozen=True)
class Applied:
    """A request's normalised plan and the profile it came from."""

    plan: SteerPlan
    profile: str | None = None
    experiment: tuple[str, str] | None = None  # (experiment, arm)
    render: RenderJob | None = None
    unit: str | None = None  # the experiment unit key
    response_model: str | None = None  # the `model` the client asked for, when vLLM served another name

    @property
    def effective_plan(self) -> SteerPlan:
        """The plan the engine got (completed on the rendered prompt, e.g. with resolved spans)."""
        return self.render.resolved if self.render is not None and self.render.resolved is not None else self.plan

    def echo(self) -> dict:
        echo = self.effective_plan.echo()
        if self.profile is not None:
            echo["profile"] = self.profile
        if self.experiment is not None:
            echo["experiment"], echo["arm"] = self.experiment
        return echo


def apply_steer(request, raw: object, state: State, unit: str | None = None, endpoint: str = "chat") -> Applied:
    """Resolve the experiment arm (by `unit`) and profile of a raw `steer` value, validate it
    against the served model, let each applied steer prepare the request (`Steer.prepare_request`)
    and put the plan on it (mutates `request.vllm_xargs` and `request.cache_salt`, and what the
    steers' preparation changes). Raises SteerError naming the field."""
    if limits.depth_exceeds(raw, limits.MAX_STEER_DEPTH):
        raise SteerError("steer", f"nested deeper than {limits.MAX_STEER_DEPTH} levels (the deepest valid steer "
                                  "object has 4)")
    config = state.steerserve_config
    raw, experiment = resolve_experiment(raw, config.experiments, unit)
    raw, profile = resolve_profile(raw, config.profiles)
    requested_model = getattr(request, "model", None)
    ctx = serving_context(state.steerserve_model_info, config.head_sets, endpoint, requested_model)
    plan = plan_for(raw, ctx)
    pending, response_model = {}, None
    for name, steer_plan in plan.steers.items():
        prepared = BY_NAME[name].prepare_request(request, steer_plan, ctx)
        if prepared is not None:
            if prepared.pending is not None:
                pending[name] = prepared.pending
            response_model = prepared.response_model or response_model
    if not plan.is_empty:
        request.vllm_xargs = {**(request.vllm_xargs or {}), **engine_args(plan)}
    if plan.salts_cache:
        # Steering changes the KV a prompt produces: salt the prefix cache with the plan, so a
        # steered request never reuses KV computed under another plan (and repeats reuse theirs).
        salt = f"steer:{plan.fingerprint()}"
        request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
    render = RenderJob(request, plan, pending) if pending else None
    return Applied(plan, profile, experiment, render, unit if experiment else None, response_model)


async def _render_hook(kind: str, serving, request, result):
    """Complete the pending steers of the request being rendered (`Steer.on_render`) on the prompt
    vLLM just rendered, and put the completed plan on the request (read next by vLLM's
    `to_sampling_params`). The prefix cache needs no extra salt for what is completed here (e.g.
    emphasised spans): the engine hashes each KV block with the emphasis of its own tokens
    (patches/prefix_cache.py), so a block is reused only under the same plan and emphasis."""
    job = _RENDER_JOB.get()
    if job is None or job.request is not request or job.resolved is not None or isinstance(result, ErrorResponse):
        return result
    field = "prompt"
    try:
        inputs = result[1] if kind == "chat" else result
        if len(inputs) != 1:
            raise SteerError("prompt", f"steering that depends on the rendered prompt ({', '.join(job.pending)}) "
                                       "needs exactly one prompt per request")
        engine_input = inputs[0]

        async def render_messages(messages: list) -> str:
            return (await render_chat_text(serving, request.model_copy(update={"messages": messages})))[1]

        prompt = RenderedPrompt(kind, list(engine_input["prompt_token_ids"]), engine_input_text(engine_input),
                                renderer_tokenizer(serving), result[0] if kind == "chat" else None, request,
                                render_messages if kind == "chat" else None)
        plan = job.plan
        for name, pending in job.pending.items():
            field = f"steer.{name}"
            plan = replace(plan, **{name: await BY_NAME[name].on_render(getattr(plan, name), pending, prompt)})
    except SteerError as err:
        metrics.count_rejected(err.field)
        return error_response(err.field, f"invalid steering: {err.field}: {err.message}")
    except Exception as err:  # noqa: BLE001 - a bug here must not become a 500 or reach the engine
        logger.exception("steerserve: completing the steering plan on the rendered prompt failed")
        metrics.count_rejected(field)
        return error_response(field, f"could not complete the steering of this request on its rendered prompt "
                                     f"({type(err).__name__}); the request was not run")
    job.resolved = plan
    request.vllm_xargs = {**(request.vllm_xargs or {}), **engine_args(plan)}
    return result


def take_plan(request, raw_request: Request, field_prefix: str = "",
              endpoint: str = "chat") -> tuple[Applied | None, JSONResponse | None]:
    """Pop `steer` off a parsed vLLM request and apply it (`apply_steer`), with the profile or
    experiment its model name selects (`MODEL@NAME`: `model` becomes MODEL; the response shows the
    name asked for).

    Mutates `request` (vllm_xargs, cache_salt, model_extra, model). Returns (what is applied, or
    None when the request had no `steer` field and named no profile; a 400 response naming
    `field_prefix` + the field, or None).
    """
    extra = request.model_extra or {}
    if request.vllm_xargs and (EXTRA_ARGS_KEY in request.vllm_xargs or SIGNATURE_KEY in request.vllm_xargs):
        key = EXTRA_ARGS_KEY if EXTRA_ARGS_KEY in request.vllm_xargs else SIGNATURE_KEY
        field = f"{field_prefix}vllm_xargs.{key}"
        return None, bad_request(field, f"{field} is reserved for steerserve; pass steering as the `steer` field")
    fam = family.current()
    requested = getattr(request, "model", None)
    try:
        named = split_model_name(requested, raw_request.app.state.steerserve_config, fam.serves)
        if STEER_FIELD not in extra and named is None and not fam.needs_plan(requested):
            return None, None
        unit = getattr(request, "user", None) or raw_request.headers.get(UNIT_HEADER)
        intercept_renders(raw_request.app.state, _render_hook)
        raw = extra.pop(STEER_FIELD, None)
        if named is not None:  # MODEL@PROFILE / MODEL@EXPERIMENT: the model, steered by that name
            base, kind, name = named
            raw = steer_for_model_name(raw, kind, name)
            request.model = base
        applied = apply_steer(request, raw, raw_request.app.state, unit, endpoint)
        return (replace(applied, response_model=requested) if named is not None else applied), None
    except SteerError as err:
        field = f"{field_prefix}{err.field}"
        metrics.count_rejected(err.field)
        return None, bad_request(field, f"invalid steering: {field}: {err.message}")


async def _echo_stream(chunks: AsyncIterator, echo: dict, model: str | None = None) -> AsyncIterator[str]:
    """Insert `echo` as the `steer` field of the first JSON data chunk of an SSE stream (and with
    `model`, put it as every chunk's `model`)."""
    pending = True
    async for chunk in chunks:
        if pending or model is not None:
            text = chunk.decode() if isinstance(chunk, bytes) else chunk
            if text.startswith("data: {"):
                events = []
                for event in text.split("\n\n"):  # a chunk may hold more than one event
                    if event.startswith("data: {"):
                        payload = json.loads(event[len("data: "):])
                        if pending:
                            payload[STEER_FIELD] = echo
                            pending = False
                        if model is not None and "model" in payload:
                            payload["model"] = model
                        event = f"data: {json.dumps(payload)}"
                    events.append(event)
                chunk = "\n\n".join(events)
        yield chunk


# the echo in response headers, for clients that drop unknown JSON fields (LangChain, proxies)
ECHO_HEADER, FINGERPRINT_HEADER, APPLIED_HEADER = "X-Steer-Echo", "X-Steer-Fingerprint", "X-Steer-Applied"
ECHO_HEADER_CAP = 4096  # bytes of compact JSON; a larger echo is left out of the headers (the body has it)


def echo_headers(echo: dict) -> dict[str, str]:
    """The echo as headers: the fingerprint ("none" when nothing ran), the applied steers' names
    (comma-separated, "none"), and the whole echo as compact ASCII JSON when it fits
    ECHO_HEADER_CAP (else `X-Steer-Echo: truncated`)."""
    text = json.dumps(echo, separators=(",", ":"), ensure_ascii=True)
    return {FINGERPRINT_HEADER: echo.get("fingerprint") or "none",
            APPLIED_HEADER: ",".join(a["steer"] for a in echo.get("applied", ())) or "none",
            ECHO_HEADER: text if len(text) <= ECHO_HEADER_CAP else "truncated"}


def with_echo(response: Response | None, applied: Applied | None) -> Response | None:
    """Add the `steer` echo to a successful vLLM response (JSON or SSE stream): in the body and
    in headers (`echo_headers`)."""
    if applied is None or response is None or response.status_code != 200:
        return response
    echo = applied.echo()
    if isinstance(response, StreamingResponse):
        response.body_iterator = _echo_stream(response.body_iterator, echo, applied.response_model)
        response.headers.update(echo_headers(echo))
        return response
    if isinstance(response, JSONResponse):
        payload = json.loads(response.body)
        payload[STEER_FIELD] = echo
        if applied.response_model is not None and "model" in payload:
            payload["model"] = applied.response_model
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        return JSONResponse(content=payload, status_code=response.status_code, headers={**headers, **echo_headers(echo)})
    return response


async def _steered(endpoint: str, stock_handler, request, raw_request: Request):
    """Take the request's plan, run vLLM's own route handler, echo and count what was applied."""
    refused = refused_by_vllm_bug(request) if endpoint == "completions" else None
    if refused is not None:
        return bad_request(*refused)
    applied, error = take_plan(request, raw_request, endpoint=endpoint)
    if error is not None:
        return error
    metrics.count_request(endpoint, applied.plan if applied else None)
    started = time.perf_counter()
    with rendering(applied):
        response = with_echo(await stock_handler(request, raw_request), applied)
    experiment = applied.experiment if applied else None
    response = feedback.record(response, raw_request.app.state.steerserve_feedback, experiment,
                               applied.unit if applied else None)
    return metrics.track_experiment(response, experiment, started)


async def _unsteered(stock_handler, request, raw_request: Request):
    """vLLM's handler for a route that does not steer (tokenization), with `MODEL@NAME` read as
    MODEL (and a fully fine-tuned variant's name as the base: they share the tokenizer), so
    harnesses can tokenize under the model name they evaluate. A served MODEL with an unknown NAME
    is a 400 naming `model`."""
    fam = family.current()
    try:
        named = split_model_name(getattr(request, "model", None), raw_request.app.state.steerserve_config, fam.serves)
    except SteerError as err:
        return bad_request(err.field, f"invalid model: {err.message}")
    if named is not None:
        request.model = named[0]
    if fam.needs_plan(request.model):  # a fully fine-tuned variant shares the base's tokenizer
        request.model = fam.base_name
    return await stock_handler(request, raw_request)


router = APIRouter()


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(_vllm.validate_json_request)],
    responses=_RESPONSES,
    description=_STEER_DOC,
)
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
    return await _steered("chat", _vllm.stock_chat_handler, request, raw_request)


@router.post(
    "/v1/completions",
    dependencies=[Depends(_vllm.validate_json_request)],
    responses=_RESPONSES,
    description=_STEER_DOC,
)
async def create_completion(request: CompletionRequest, raw_request: Request):
    return await _steered("completions", _vllm.stock_completion_handler, request, raw_request)


_TOKENIZE_RESPONSES = {code: body for code, body in _RESPONSES.items() if code != HTTPStatus.OK.value}


@router.post("/tokenize", dependencies=[Depends(_vllm.validate_json_request)], responses=_TOKENIZE_RESPONSES)
async def tokenize(request: _vllm.TokenizeRequest, raw_request: Request):
    """vLLM's /tokenize; `model` may name a profile or experiment (`MODEL@NAME`)."""
    return await _unsteered(_vllm.stock_tokenize_handler, request, raw_request)


@router.post("/detokenize", dependencies=[Depends(_vllm.validate_json_request)], responses=_TOKENIZE_RESPONSES)
async def detokenize(request: _vllm.DetokenizeRequest, raw_request: Request):
    """vLLM's /detokenize; `model` may name a profile or experiment (`MODEL@NAME`)."""
    return await _unsteered(_vllm.stock_detokenize_handler, request, raw_request)


@router.get("/v1/models")
async def list_models(raw_request: Request):
    """vLLM's model list (the base and LoRA adapters) plus the fully fine-tuned variants and their
    mixes, each annotated with the variant and mixing it serves, and `BASE@NAME` for every profile
    and experiment (annotated with it; a profile with its steer object)."""
    listing = await served_models_listing(raw_request.app.state)
    fam = family.current()
    for entry in listing.get("data", []):
        variant, label = fam.variant_for_model(entry.get("id"))
        if variant is not None:
            entry["steerserve"] = {"variant": variant.name, "mixing": label or "tuned", "kind": variant.kind}
    listing["data"] = listing.get("data", []) + fam.models_listing()
    config = raw_request.app.state.steerserve_config
    named = []
    for entry in listing["data"]:
        if entry.get("id") != fam.base_name:
            continue
        for kind, names in (("profile", config.profiles), ("experiment", config.experiments)):
            for name in sorted(names):
                about = {kind: name}
                if kind == "profile":
                    about["steer"] = config.profiles[name]
                named.append({**entry, "id": f"{entry['id']}{MODEL_SEPARATOR}{name}", "parent": entry["id"],
                              "steerserve": about})
    listing["data"] += named
    return JSONResponse(content=listing)


@router.get("/v1/steer/profiles")
async def list_profiles(raw_request: Request):
    """The server's steering profiles (from `steerserve serve --config`), with what each applies."""
    info = raw_request.app.state.steerserve_model_info
    data = []
    for name, steer in sorted(raw_request.app.state.steerserve_config.profiles.items()):
        plan = normalise(steer, info, raw_request.app.state.steerserve_config.head_sets)
        data.append({"name": name, "steer": steer, "applied": plan.applied(), "fingerprint": plan.fingerprint()})
    return {"object": "list", "data": data}


_PLAYGROUND = None


@router.get("/playground", include_in_schema=False)
async def playground():
    """The side-by-side playground page (static; its API calls carry the key typed into it)."""
    global _PLAYGROUND
    if _PLAYGROUND is None:
        from pathlib import Path

        _PLAYGROUND = (Path(__file__).parent / "data" / "playground.html").read_text()
    from fastapi.responses import HTMLResponse

    return HTMLResponse(_PLAYGROUND)


@router.get("/v1/steer/head_sets")
async def list_head_sets(raw_request: Request):
    """The head sets loaded for context-attention steering (`--head-set`, config `head_sets`)."""
    sets = raw_request.app.state.steerserve_config.head_sets
    return {"object": "list", "data": [
        {"name": name, "num_heads": len(pairs), "heads": [list(p) for p in pairs]} for name, pairs in sorted(sets.items())
    ]}


@router.get("/v1/steer/vectors")
async def list_vectors():
    """The steering vectors the server loaded (`--vector`, config `vectors`): per vector its
    layers, the L2 norm of its direction on each, its hidden size, source format and model hint."""
    vectors = family.current().vectors
    return {"object": "list", "data": [vectors[name].listing() for name in sorted(vectors)]}


# request bodies of vLLM's routes that accept `steer` (OpenAPI component names)
STEERABLE_REQUEST_SCHEMAS = ("ChatCompletionRequest", "CompletionRequest")


def document_steer_in_openapi(app: FastAPI) -> None:
    """Add the `steer` object (`SteerSpec`'s JSON schema) to the generation requests' bodies in
    the server's OpenAPI document: vLLM's request models take it as an extra field, so FastAPI
    would not list it (clients and API fuzzers read the contract from /openapi.json)."""
    from .schema import SteerSpec

    original = app.openapi

    def openapi():
        if getattr(app, "_steerserve_openapi", None) is not None:
            return app._steerserve_openapi
        schema = original()
        for path in [p for p in schema.get("paths", {}) if limits.unserved(p.split("{")[0].rstrip("/") or p)]:
            schema["paths"].pop(path)
        steer = SteerSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in steer.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components["SteerSpec"] = steer
        for name in STEERABLE_REQUEST_SCHEMAS:
            if name in components:
                components[name].setdefault("properties", {})["steer"] = {
                    "anyOf": [{"$ref": "#/components/schemas/SteerSpec"}, {"type": "null"}],
                    "description": "steerserve: per-request steering (docs/steering.md)"}
        if os.environ.get(auth.API_KEY_ENV):
            # the key requirement, per operation (API clients and fuzzers check it: schemathesis'
            # `ignored_auth` sends each operation without and with a wrong key)
            schema["components"].setdefault("securitySchemes", {})["bearerAuth"] = {
                "type": "http", "scheme": "bearer", "description": "the server's API key (steerserve serve --api-key)"}
            public = auth.public_paths()
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    if isinstance(operation, dict) and method in ("get", "post", "put", "patch", "delete"):
                        operation["security"] = [] if (path in public and method == "get") else [{"bearerAuth": []}]
        app._steerserve_openapi = schema
        return schema

    app.openapi = openapi
