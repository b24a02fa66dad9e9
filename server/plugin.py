"""steerserve's vLLM endpoint plugin (entry point group `vllm.endpoint_plugins`, name
`steerserve_api`): attaches the middlewares and routers of `server/` to vLLM's OpenAI app and sets
up the API server's state. Runs in the API server process."""

from __future__ import annotations

import logging
import os
from argparse import Namespace

from fastapi import FastAPI
from starlette.datastructures import State

from steerserve.patches.adapter.server import engine_dead, model_info_from_engine

from . import api, auth, compare, feedback, limits
from .profiles import load_for_server

logger = logging.getLogger("steerserve")


def feedback_db_path():
    """$STEERSERVE_FEEDBACK_DB (set by `steerserve serve --feedback-db`), else under $STEERSERVE_HOME."""
    from .model_store import cache_root

    return os.environ.get(feedback.FEEDBACK_DB_ENV) or str(cache_root() / "ab-feedback.sqlite3")


_served_engine: list = []  # the engine client this process serves (set at start-up)


def engine_died() -> bool:
    """Whether the engine this API process served died (read after the server stopped)."""
    return any(engine_dead(client) for client in _served_engine)


class SteerEndpointPlugin:
    """vLLM endpoint plugin: replaces the generation routes, records the served model's shape."""

    name = "steerserve_api"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        # outermost last: the key is checked before a body is read; error bodies are capped
        app.add_middleware(limits.RequestGuard)
        app.add_middleware(limits.ErrorCap)
        app.add_middleware(auth.DefaultDeny)
        api.document_steer_in_openapi(app)
        app.include_router(api.router)
        app.include_router(compare.router)
        app.include_router(feedback.router)

    async def init_state(self, engine_client, state: State, args: Namespace) -> None:
        if engine_client is None:
            raise RuntimeError("steerserve needs an engine; the render-only server is not supported")
        _served_engine.append(engine_client)
        state.steerserve_model_info = model_info_from_engine(engine_client)
        state.steerserve_config = load_for_server(state.steerserve_model_info)
        state.steerserve_feedback = feedback.FeedbackStore(feedback_db_path())
        logger.info("steerserve: serving %s with %d steering profile(s), %d experiment(s)",
                    state.steerserve_model_info, len(state.steerserve_config.profiles),
                    len(state.steerserve_config.experiments))
