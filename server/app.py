"""The app: its lifespan and its route table (paths -> handlers), nothing else. Every handler lives in
`server.api` and takes the request and the running gateway; settings, clients and policies are built in the
lifespan (`server.gateway`), never at import."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from threadpoolctl import threadpool_limits

from routers.embedding.base import Embedder
from server.api import openapi as doc
from server.api.admin import handle_keys, handle_reload, handle_revoke, reload_and_log
from server.api.completions import (
    CHAT_EP,
    COMPLETIONS,
    COUNT_TOKENS,
    EMBEDDINGS,
    MESSAGES_EP,
    RERANK,
    RESPONSES_EP,
    SCORE,
    relay_handler,
)
from server.api.explain import handle_route
from server.api.feedback import handle_feedback
from server.api.middleware import RequestIdMiddleware
from server.api.probes import (
    handle_healthz,
    handle_metrics,
    handle_models,
    handle_readyz,
    handle_status,
    handle_ui,
)
from server.api.stored_responses import handle_cancel_response, handle_get_response
from server.config import TurnoutConfig, load_config
from server.errors import install_handlers
from server.gateway import GatewayState
from server.telemetry.tracing import start_tracing, stop_tracing
from server.upstream.client import UpstreamClient

CONFIG_ENV = "TURNOUT_CONFIG"
Handler = Callable[[Request, GatewayState], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """One row of the route table: the OpenAPI text and schemas sit beside the handler they describe."""

    method: str
    path: str
    name: str  # FastAPI's route name, from which the operationId in /openapi.json is made
    handler: Handler
    summary: str
    extra: dict[str, Any] = field(default_factory=dict)  # FastAPI's route options (openapi_extra, responses)


# The handlers read the raw request (the client's JSON is forwarded as written), so FastAPI cannot see their bodies
# or answers: `server.api.openapi` describes them, and `/openapi.json` is what the fuzz test holds them to. Two
# routes rather than one for both methods of /admin/keys: one route gives both operations the same operationId.
ROUTES = (
    Route("POST", "/v1/chat/completions", "chat_completions", relay_handler(CHAT_EP),
          "Create a chat completion (OpenAI protocol)",
          {"openapi_extra": doc.CHAT_BODY, "responses": doc.CHAT_RESPONSES}),
    Route("POST", "/v1/completions", "completions", relay_handler(COMPLETIONS),
          "Create a text completion (OpenAI protocol)",
          {"openapi_extra": doc.COMPLETION_BODY, "responses": doc.COMPLETION_RESPONSES}),
    Route("POST", "/v1/responses", "responses", relay_handler(RESPONSES_EP),
          "Create a response (OpenAI Responses API); a follow-up goes to the worker holding its conversation",
          {"openapi_extra": doc.RESPONSES_BODY, "responses": doc.RESPONSES_RESPONSES}),
    Route("GET", "/v1/responses/{response_id}", "get_response", handle_get_response,
          "Retrieve a stored response from the worker that made it (OpenAI Responses API)",
          {"openapi_extra": doc.RESPONSE_ID_PARAM, "responses": doc.STORED_RESPONSE_RESPONSES}),
    Route("POST", "/v1/responses/{response_id}/cancel", "cancel_response", handle_cancel_response,
          "Cancel a response on the worker that made it (OpenAI Responses API)",
          {"openapi_extra": doc.RESPONSE_ID_PARAM, "responses": doc.STORED_RESPONSE_RESPONSES}),
    Route("POST", "/v1/messages", "messages", relay_handler(MESSAGES_EP), "Create a message (Anthropic Messages API)",
          {"openapi_extra": doc.MESSAGES_BODY, "responses": doc.MESSAGES_RESPONSES}),
    Route("POST", "/v1/messages/count_tokens", "count_tokens", relay_handler(COUNT_TOKENS),
          "Count a message's prompt tokens (Anthropic Messages API)",
          {"openapi_extra": doc.COUNT_TOKENS_BODY, "responses": doc.COUNT_TOKENS_RESPONSES}),
    Route("POST", "/v1/embeddings", "embeddings", relay_handler(EMBEDDINGS),
          "Create embeddings with the embedding model named (a pooling worker; OpenAI protocol)",
          {"openapi_extra": doc.EMBEDDINGS_BODY, "responses": doc.EMBEDDINGS_RESPONSES}),
    Route("POST", "/v1/rerank", "rerank", relay_handler(RERANK),
          "Rank documents by relevance to a query with the model named (a pooling worker; vLLM's protocol)",
          {"openapi_extra": doc.RERANK_BODY, "responses": doc.RERANK_RESPONSES}),
    Route("POST", "/v1/score", "score", relay_handler(SCORE),
          "Score text pairs with the model named (a pooling worker; vLLM's protocol)",
          {"openapi_extra": doc.SCORE_BODY, "responses": doc.SCORE_RESPONSES}),
    Route("POST", "/v1/route", "route", handle_route,
          "Explain: the routing decision for a chat request, without running it",
          {"openapi_extra": doc.ROUTE_BODY, "responses": doc.ROUTE_RESPONSES}),
    Route("POST", "/v1/feedback", "feedback", handle_feedback,
          "Score a routed request's answer (0..1) for learning policies",
          {"openapi_extra": doc.FEEDBACK_BODY, "responses": doc.FEEDBACK_RESPONSES}),
    Route("POST", "/admin/reload", "reload", handle_reload,
          "Re-read the config file and swap it in (admin key required)",
          {"responses": doc.RELOAD_RESPONSES}),
    Route("GET", "/admin/keys", "list_keys", handle_keys, "List client keys (admin key required)",
          {"responses": doc.LIST_KEYS_RESPONSES}),
    Route("POST", "/admin/keys", "add_key", handle_keys, "Add a stored client key (admin key required)",
          {"status_code": 201, "openapi_extra": doc.ADD_KEY_BODY, "responses": doc.ADD_KEY_RESPONSES}),
    Route("DELETE", "/admin/keys/{name}", "revoke", handle_revoke, "Revoke a stored client key (admin key required)",
          {"openapi_extra": doc.KEY_NAME_PARAM, "responses": doc.REVOKE_KEY_RESPONSES}),
    Route("GET", "/v1/models", "models", handle_models, "Served models and routing policies",
          {"responses": doc.MODELS_RESPONSES}),
    Route("GET", "/healthz", "healthz", handle_healthz, "The process is alive", {"responses": doc.HEALTHZ_RESPONSES}),
    Route("GET", "/readyz", "readyz", handle_readyz,
          "At least one worker is reachable", {"responses": doc.READYZ_RESPONSES}),
    Route("GET", "/ui", "ui", handle_ui, "Status page: routing mix, cost and savings, latency, worker health",
          {"response_class": HTMLResponse, "responses": doc.TEXT_RESPONSES}),
    Route("GET", "/ui/status.json", "ui_status", handle_status,
          "The status page's numbers", {"responses": doc.STATUS_RESPONSES}),
    Route("GET", "/metrics", "metrics", handle_metrics, "Prometheus metrics",
          {"response_class": PlainTextResponse, "responses": doc.METRICS_RESPONSES}),
)


def _endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The FastAPI endpoint for `handler`: the request, and the gateway the lifespan built."""
    async def endpoint(request: Request) -> Response:
        return await handler(request, request.app.state.gateway)
    return endpoint


def _freeze_heap() -> None:
    """Collect, then freeze what the start-up left (modules, config, policies): Python's full collections then no
    longer walk those objects. A full collection of a started gateway's 97,000 tracked objects took 63-79 ms, during
    which the event loop served nothing: the side-by-side benchmark saw p99 latencies of twice direct's while the
    gateway's own time stayed under 6 ms. Frozen, a full collection took 1 ms (both measured in one process)."""
    gc.collect()
    gc.freeze()


def create_app(
    config: TurnoutConfig | None = None,
    *,
    config_path: str | Path | None = None,
    client: UpstreamClient | None = None,
    health_checks: bool = True,
    embedder: Embedder | None = None,
    handle_sighup: bool = False,
    freeze_heap: bool = False,
) -> FastAPI:
    """Build the gateway app from a config object, a config file, or the file named by `TURNOUT_CONFIG`.

    `config_path` is also what a reload re-reads (with `config` given too, `config` is what starts).
    `client` replaces the pooled upstream client (tests use it to reach in-process fakes);
    `health_checks=False` skips the background health and load polling; `embedder` replaces the
    configured embedder; `handle_sighup` makes SIGHUP reload the config file; `freeze_heap` moves every object
    alive once the gateway has started out of the garbage collector's sight (`gc.freeze`, for the server process,
    see `_freeze_heap`).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        path = config_path or os.environ.get(CONFIG_ENV)
        cfg = config
        if cfg is None:
            if not path:
                raise RuntimeError(f"no config: pass --config FILE or set {CONFIG_ENV}")
            cfg = load_config(path)
        # The gateway's matrix products are tiny (one prompt against an index). Multi-threaded BLAS makes them
        # no faster, and its idle threads spin after each one: measured at 50 routed requests/s, 23 ms of CPU
        # per decision with the default threads against 2 ms with one. Embedding has its own threads.
        threadpool_limits(limits=1, user_api="blas")
        state = GatewayState(cfg, config_path=path, client=client, embedder=embedder)
        app.state.gateway, app.state.started_at = state, time.time()
        state.start(background_checks=health_checks)
        traces = start_tracing()  # only when the OTEL_* variables ask for it
        if freeze_heap:
            _freeze_heap()
        try:
            with _reload_on_sighup(state, enabled=bool(handle_sighup and path)):
                yield
        finally:
            await state.aclose()
            if traces:
                stop_tracing()

    # /openapi.json is served (the API's shapes, no data); FastAPI's /docs and /redoc are not: they load their
    # scripts from a CDN into a page on the gateway's origin.
    app = FastAPI(title="Turnout", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    for r in ROUTES:
        app.add_api_route(r.path, _endpoint(r.handler), methods=[r.method], name=r.name, summary=r.summary,
                          **r.extra)
    return app


class _reload_on_sighup:
    """While the block runs, SIGHUP reloads the config file (when `enabled`)."""

    def __init__(self, state: GatewayState, *, enabled: bool) -> None:
        self.state, self.enabled = state, enabled
        self.pending: set[asyncio.Task[None]] = set()

    def __enter__(self) -> None:
        if self.enabled:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            with suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(reload_and_log(self.state, "SIGHUP"))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
