"""Authentication: default deny on every route when an API key is configured.

vLLM's own key middleware only guards paths under /v1, /v2, /inference and /cohere: SageMaker's
`/invocations`, `/tokenize`, `/detokenize`, `/generative_scoring`, `/load`, `/version`, the API
docs and whatever a vLLM upgrade adds would answer without the key. `DefaultDeny` (a pure ASGI
middleware in front of every route) requires `Authorization: Bearer <key>` everywhere except:

- `/health` and `/ping` (GET): liveness probes, which orchestrators call without credentials; they
  say only whether the engine is up;
- `/metrics` and `/playground` (GET), unless closed with `steerserve serve --public-routes none`
  (or a subset): Prometheus scrapers usually do not authenticate, the metric labels are closed
  sets (steer kinds, known fields, configured experiments and arms: no client input), and the
  playground is a static page whose own API calls carry the key typed into it. Close them where
  traffic volumes or the configured experiment names are not for everyone.
- the API reference (`/docs`, its assets and `/openapi.json`) only when opened with
  `--public-routes metrics,playground,docs`: a browser cannot send the key to it.

CORS preflights (OPTIONS) pass, as in vLLM (they carry no credentials by design and generate
nothing). Keys are compared as SHA-256 digests in constant time. A key in the query string
(`?api_key=...`) is never accepted, and `QueryCredentialFilter` removes it from the access log.
Runs in the API server process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets

API_KEY_ENV = "STEERSERVE_API_KEY"
PUBLIC_ROUTES_ENV = "STEERSERVE_PUBLIC_ROUTES"
ALWAYS_PUBLIC = frozenset({"/health", "/ping"})
# routes that can be public (`--public-routes`), by the name the flag takes: their paths
OPTIONAL_PUBLIC = {
    "metrics": ("/metrics",),
    "playground": ("/playground",),
    # the API reference: Swagger UI with vLLM's vendored assets (`--enable-offline-docs`), its schema
    "docs": ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/static/swagger-ui-bundle.js",
             "/static/swagger-ui.css"),
}
DEFAULT_PUBLIC = ("metrics", "playground")


def parse_public_routes(value: str) -> tuple[str, ...]:
    """`--public-routes` value -> route names; raises ValueError naming the allowed values."""
    value = value.strip()
    if value in ("", "none"):
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    bad = [n for n in names if n not in OPTIONAL_PUBLIC]
    if bad:
        raise ValueError(f"unknown route name(s) {', '.join(map(repr, bad))}; allowed: "
                         f"{', '.join(OPTIONAL_PUBLIC)} (comma-separated) or none")
    return names


def public_paths() -> frozenset[str]:
    """The paths answered without a key (read from the environment `serve` sets)."""
    raw = os.environ.get(PUBLIC_ROUTES_ENV)
    names = DEFAULT_PUBLIC if raw is None else parse_public_routes(raw)
    return ALWAYS_PUBLIC | {path for n in names for path in OPTIONAL_PUBLIC[n]}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def bearer_matches(header_value: bytes | None, key_digest: bytes) -> bool:
    if not header_value:
        return False
    scheme, _, token = header_value.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(_digest(token.strip()), key_digest)


_UNAUTHORIZED = (b'{"error":{"message":"missing or wrong API key: send the header '
                 b'Authorization: Bearer <key>","type":"AuthenticationError","param":null,"code":401}}')


class DefaultDeny:
    """ASGI middleware: with a key configured, 401 on every path but the public ones (see module
    docstring); websocket upgrades without the key are closed before they are accepted."""

    def __init__(self, app, key: str | None = None, public: frozenset[str] | None = None) -> None:
        self.app = app
        key = os.environ.get(API_KEY_ENV) if key is None else key
        self.key_digest = _digest(key) if key else None
        self.public = public_paths() if public is None else public

    async def __call__(self, scope, receive, send) -> None:
        if self.key_digest is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "").removeprefix(scope.get("root_path", "")) or "/"
        method = scope.get("method", "GET")
        if method == "OPTIONS" or (path in self.public and method in ("GET", "HEAD")):
            await self.app(scope, receive, send)
            return
        if bearer_matches(dict(scope.get("headers") or ()).get(b"authorization"), self.key_digest):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong API key"})
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(_UNAUTHORIZED)).encode()),
                                (b"www-authenticate", b"Bearer"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})


# query-string parameters whose values never reach a log
_SECRET_QUERY = re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access[_-]?token|auth|authorization|password|secret)"
                           r"=)[^&#\s]*")


def redact_query(text: str) -> str:
    """`/v1/models?api_key=abc&x=1` -> `/v1/models?api_key=<redacted>&x=1`."""
    return _SECRET_QUERY.sub(r"\1<redacted>", text)


class QueryCredentialFilter(logging.Filter):
    """A logging filter that redacts credentials from query strings in a record's arguments (the
    access log writes the request path with its query) and message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_query(v) if isinstance(v, str) else v for k, v in record.args.items()}
        if isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        return True


def install_log_redaction() -> None:
    """Attach `QueryCredentialFilter` to the access and error loggers of the HTTP server and to
    the handlers of the root logger (idempotent)."""
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error", "uvicorn")]
    for logger in loggers:
        if not any(isinstance(f, QueryCredentialFilter) for f in logger.filters):
            logger.addFilter(QueryCredentialFilter())
        for handler in logger.handlers:
            if not any(isinstance(f, QueryCredentialFilter) for f in handler.filters):
                handler.addFilter(QueryCredentialFilter())
