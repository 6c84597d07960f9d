"""The one place that decides status codes and error bodies.

Every error leaves the gateway in the shape of the API its path belongs to: OpenAI's,
`{"error": {"message", "type", "param", "code"}}`, or on Anthropic's paths (`/v1/messages...`) Anthropic's,
`{"type": "error", "error": {"type", "message"}}`. Third-party exceptions are mapped here at the boundary, so
handlers raise `GatewayError` and never build error responses themselves.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match, Route

from server.outcome import Outcome

log = logging.getLogger("turnout.errors")

Dialect = Literal["openai", "anthropic"]
#: Paths of Anthropic's API: errors there take Anthropic's shape, which its SDK reads.
ANTHROPIC_PATHS = ("/v1/messages", "/v1/complete")
# Anthropic's error types by status (its documented `error.type` values).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    529: "overloaded_error"}


def dialect_of(path: str) -> Dialect:
    """The API whose error shape a request on `path` expects."""
    return "anthropic" if path.startswith(ANTHROPIC_PATHS) else "openai"


def anthropic_type(status: int) -> str:
    """Anthropic's `error.type` for an HTTP status."""
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


class GatewayError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | int | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        upstream_status: int | None = None,
        dialect: Dialect = "openai",
    ) -> None:
        super().__init__(message)
        self.dialect = dialect
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        # Set when the worker produced this error (its status), None when the gateway did.
        self.upstream_status = upstream_status

    @property
    def outcome(self) -> Outcome:
        """How a request that ends with this error ended (the bounded `status` label in metrics and logs)."""
        if self.status < 500:
            return Outcome.CLIENT_ERROR if self.upstream_status is None else Outcome.WORKER_CLIENT_ERROR
        return Outcome.of_code(self.code)

    def log_message(self) -> str:
        """What the request log may say. A worker's own message can quote the request (prompt text),
        so only its status and error type are logged."""
        if self.upstream_status is None:
            return self.message
        return f"worker answered {self.upstream_status} ({self.type}, code {self.code})"

    def body(self) -> dict[str, Any]:
        """The error object of the API the request spoke (OpenAI's, or Anthropic's on its paths)."""
        if self.dialect == "anthropic":
            return {"type": "error", "error": {"type": anthropic_type(self.status), "message": self.message}}
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def internal_error() -> GatewayError:
    """500: a bug in the gateway (its traceback goes to the gateway's log, never to the client)."""
    return GatewayError(500, "Internal error in the gateway.", type="server_error", code="internal_error")


def bad_request(message: str, param: str | None = None) -> GatewayError:
    """400: the request is malformed or violates the schema."""
    return GatewayError(400, message, param=param, code="invalid_request")


def model_not_found(model: str) -> GatewayError:
    """404: `model` names no worker, served model or policy."""
    return GatewayError(
        404,
        f"The model '{model}' does not exist. Use a worker or model name, 'auto', or 'turnout/<policy>' "
        "(GET /v1/models lists them).",
        param="model",
        code="model_not_found",
    )


def payload_too_large(limit: int) -> GatewayError:
    """413: the body exceeds the configured limit."""
    return GatewayError(413, f"Request body exceeds the limit of {limit} bytes.", code="payload_too_large")


def no_worker_available(model: str) -> GatewayError:
    """503: every worker serving `model` is down."""
    return GatewayError(
        503, f"No healthy worker is serving '{model}'.", type="server_error", code="no_healthy_worker",
        headers={"retry-after": "5"},
    )


def upstream_unreachable(worker: str) -> GatewayError:
    """502: the worker could not be reached (connection refused, reset before an answer)."""
    return GatewayError(
        502, f"Worker '{worker}' is unreachable.", type="server_error", code="upstream_unreachable"
    )


def upstream_timeout(worker: str) -> GatewayError:
    """504: the worker did not answer in time."""
    return GatewayError(504, f"Worker '{worker}' timed out.", type="server_error", code="upstream_timeout")


def upstream_stream_error(worker: str, detail: str) -> GatewayError:
    """An error that ended a stream after it had started (sent as a final SSE event)."""
    return GatewayError(
        502, f"Worker '{worker}' failed mid-stream: {detail}", type="server_error", code="upstream_stream_error"
    )


def from_upstream_failure(kind: str, worker: str) -> GatewayError:
    """Map the kind of a failed exchange with `worker` (`server.upstream.client.UpstreamFailure.kind`)."""
    if kind == "busy":
        # Every pooled connection is busy: the gateway is saturated, not the worker slow.
        return GatewayError(503, "The gateway has no free connection to the workers; retry shortly.",
                            type="server_error", code="gateway_busy", headers={"retry-after": "1"})
    if kind == "timeout":
        return upstream_timeout(worker)
    return upstream_unreachable(worker)


def from_upstream_status(worker: str, status: int, content: bytes) -> GatewayError:
    """Map a worker's non-2xx answer: 4xx passes through with its message, 5xx becomes 502."""
    message, _worker_type, param, code = _upstream_error_fields(content)
    if status in (401, 403):
        # The client's key is not what the worker checks (the gateway's worker key is): a gateway
        # configuration problem, not the client's.
        return GatewayError(502, f"Worker '{worker}' refused the gateway's credentials ({status}).",
                            type="server_error", code="upstream_auth_failed", upstream_status=status)
    if 400 <= status < 500:
        # The worker's message, in OpenAI's error schema: vLLM's `type` is an exception's name (`BadRequestError`)
        # and its `code` the status as an integer, which OpenAI's clients do not expect there.
        return GatewayError(
            status,
            message or f"Worker '{worker}' answered {status}.",
            type="rate_limit_exceeded" if status == 429 else "invalid_request_error",
            param=param,
            code=code if isinstance(code, str) else _WORKER_CODES.get(status, "invalid_request"),
            upstream_status=status,
        )
    return GatewayError(
        502,
        f"Worker '{worker}' answered {status}" + (f": {message}" if message else "."),
        type="server_error",
        code="upstream_error",
        upstream_status=status,
    )


#: A worker's 4xx status as an OpenAI-style error code, when the worker gave none as a string.
_WORKER_CODES = {404: "not_found", 409: "conflict", 413: "payload_too_large", 429: "rate_limit_exceeded"}


def _upstream_error_fields(content: bytes) -> tuple[str | None, str | None, str | None, str | int | None]:
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        text = content.decode("utf-8", "replace").strip()
        return (text[:500] or None, None, None, None)
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        msg = err.get("message")
        return (str(msg) if msg is not None else None, *_typed_fields(err))
    if isinstance(data, dict) and isinstance(data.get("message"), str):  # vLLM's older flat shape
        return (data["message"], *_typed_fields(data))
    return (None, None, None, None)


def _typed_fields(err: dict[str, Any]) -> tuple[str | None, str | None, str | int | None]:
    """A worker's `type`, `param` and `code`, kept only when of the types OpenAI's error object has (string;
    string; string or integer): the client gets the documented shape whatever the worker sent."""
    etype, param, code = err.get("type"), err.get("param"), err.get("code")
    return (etype if isinstance(etype, str) else None, param if isinstance(param, str) else None,
            code if isinstance(code, str | int) and not isinstance(code, bool) else None)


def error_response(err: GatewayError, headers: dict[str, str] | None = None) -> Response:
    """The JSON response for `err`, with any extra headers (e.g. the request id)."""
    return Response(
        orjson.dumps(err.body()),
        status_code=err.status,
        media_type="application/json",
        headers={**err.headers, **(headers or {})},
    )


# FastAPI's own documentation pages: not part of the API a client is told about.
_DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def unsupported_path(request: Request) -> GatewayError:
    """404 for a path the gateway does not serve: it names the path and lists what is served, in the shape of the
    API the path belongs to (a bare "Not Found" tells a client nothing)."""
    served = sorted({f"{m} {r.path}" for r in request.app.router.routes
                     if isinstance(r, Route) and r.methods and r.path not in _DOC_PATHS
                     for m in r.methods if m != "HEAD"}, key=lambda s: (s.split()[1], s.split()[0]))
    path = request.url.path
    return GatewayError(404, f"This gateway does not serve {request.method} {path}. It serves: "
                             f"{', '.join(served)} (described in /openapi.json).",
                        type="invalid_request_error", code="unsupported_path", dialect=dialect_of(path))


def allowed_methods(request: Request) -> str:
    """The `Allow` header of a 405: the methods of every route of this path. Starlette names only those of the
    first route it found for the path, and a path may have one route per method (`/admin/keys`)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def install_handlers(app: FastAPI) -> None:
    """Make every error the app can produce, including the framework's own, shaped as its API expects."""

    def request_id(request: Request) -> dict[str, str]:
        rid = getattr(request.state, "request_id", None)
        return {"x-turnout-request-id": rid} if rid else {}

    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc, request_id(request))

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(bad_request(f"{loc}: {first.get('msg', 'invalid')}", loc or None))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404 and exc.detail == "Not Found":  # the router found no route for the path
            return error_response(unsupported_path(request), request_id(request))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = GatewayError(exc.status_code, str(exc.detail), code=code, dialect=dialect_of(request.url.path))
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers = {k: v for k, v in headers.items() if k.lower() != "allow"} | {"allow": allowed_methods(request)}
        return error_response(err, headers)

    async def on_client_gone(request: Request, exc: Exception) -> Response:
        # The client left (or its body stopped arriving: `server.connections` ended it) before its request was
        # read: nobody reads this answer, and it is no bug.
        return Response(status_code=499, headers=request_id(request))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # A bug: log the traceback for the operator, but never send it to the client.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = internal_error()
        # This handler runs outside the request-id middleware, so it sets the header itself.
        return error_response(err, request_id(request))

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(Exception, on_unexpected)
