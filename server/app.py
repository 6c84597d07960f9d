"""The FastAPI app factory. Settings, clients and policies are built in the lifespan, never at import."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from threadpoolctl import threadpool_limits

from routers.embedders import Embedder
from server import openapi as doc
from server.admin import handle_feedback, handle_keys, handle_reload, handle_route, reload_and_log
from server.config import TurnoutConfig, load_config
from server.errors import install_handlers
from server.middleware import RequestIdMiddleware
from server.proxy import handle_completion
from server.state import GatewayState
from server.workers import Health

CONFIG_ENV = "TURNOUT_CONFIG"
UI_PAGE = Path(__file__).parent / "ui" / "index.html"
log = logging.getLogger("turnout.app")


def create_app(
    config: TurnoutConfig | None = None,
    *,
    config_path: str | Path | None = None,
    client: httpx.AsyncClient | None = None,
    health_checks: bool = True,
    embedder: Embedder | None = None,
    handle_sighup: bool = False,
) -> FastAPI:
    """Build the gateway app from a config object, a config file, or the file named by `TURNOUT_CONFIG`.

    `config_path` is also what a reload re-reads (with `config` given too, `config` is what starts).
    `client` replaces the pooled upstream client (tests use it to reach in-process fakes);
    `health_checks=False` skips the background health and load polling; `embedder` replaces the
    configured embedder; `handle_sighup` makes SIGHUP reload the config file.
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
        app.state.gateway = state
        app.state.started_at = time.time()
        state.start(background_checks=health_checks)
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()
        if handle_sighup and path:
            def on_sighup() -> None:
                task = loop.create_task(reload_and_log(state, "SIGHUP"))
                pending.add(task)
                task.add_done_callback(pending.discard)
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        try:
            yield
        finally:
            if handle_sighup and path:
                with suppress(Exception):
                    loop.remove_signal_handler(signal.SIGHUP)
            await state.aclose()

    app = FastAPI(title="Turnout", version="0.1.0", lifespan=lifespan)
    install_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    def gw(request: Request) -> GatewayState:
        state: GatewayState = request.app.state.gateway
        return state

    # The handlers read the raw request (the client's JSON is forwarded as written), so FastAPI cannot see their
    # bodies or answers: `server.openapi` describes them, and `/openapi.json` is what the fuzz test holds them to.
    @app.post("/v1/chat/completions", summary="Create a chat completion (OpenAI protocol)",
              openapi_extra=doc.CHAT_BODY, responses=doc.CHAT_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        return await handle_completion("chat", request, gw(request))

    @app.post("/v1/completions", summary="Create a text completion (OpenAI protocol)",
              openapi_extra=doc.COMPLETION_BODY, responses=doc.COMPLETION_RESPONSES)
    async def completions(request: Request) -> Response:
        return await handle_completion("completions", request, gw(request))

    @app.post("/v1/route", summary="Explain: the routing decision for a chat request, without running it",
              openapi_extra=doc.ROUTE_BODY, responses=doc.ROUTE_RESPONSES)
    async def route(request: Request) -> Response:
        return await handle_route(request, gw(request))

    @app.post("/v1/feedback", summary="Score a routed request's answer (0..1) for learning policies",
              openapi_extra=doc.FEEDBACK_BODY, responses=doc.FEEDBACK_RESPONSES)
    async def feedback(request: Request) -> Response:
        return await handle_feedback(request, gw(request))

    @app.post("/admin/reload", summary="Re-read the config file and swap it in (admin key required)",
              responses=doc.RELOAD_RESPONSES)
    async def reload(request: Request) -> Response:
        return await handle_reload(request, gw(request))

    # Two routes rather than one for both methods: one route gives both operations the same operationId.
    @app.get("/admin/keys", summary="List client keys (admin key required)", responses=doc.LIST_KEYS_RESPONSES)
    async def list_keys(request: Request) -> Response:
        return await handle_keys(request, gw(request))

    @app.post("/admin/keys", summary="Add a stored client key (admin key required)", status_code=201,
              openapi_extra=doc.ADD_KEY_BODY, responses=doc.ADD_KEY_RESPONSES)
    async def add_key(request: Request) -> Response:
        return await handle_keys(request, gw(request))

    # `name` is read from the path here, not taken as a parameter: FastAPI would document a 422 for it, which
    # this gateway never answers (its validation errors are 400s).
    @app.delete("/admin/keys/{name}", summary="Revoke a stored client key (admin key required)",
                openapi_extra=doc.KEY_NAME_PARAM, responses=doc.REVOKE_KEY_RESPONSES)
    async def revoke(request: Request) -> Response:
        return await handle_keys(request, gw(request), request.path_params["name"])

    @app.get("/v1/models", summary="Served models and routing policies", responses=doc.MODELS_RESPONSES)
    async def models(request: Request) -> JSONResponse:
        created = int(request.app.state.started_at)
        data = [
            {"id": mid, "object": "model", "created": created, "owned_by": "turnout"}
            for mid in gw(request).live.table.model_ids()
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/healthz", summary="The process is alive", responses=doc.HEALTHZ_RESPONSES)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", summary="At least one worker is reachable", responses=doc.READYZ_RESPONSES)
    async def readyz(request: Request) -> JSONResponse:
        registry = gw(request).live.registry
        workers = {
            w.name: {"model": w.model, "health": w.health.value, "in_flight": w.in_flight,
                     "error": w.last_error, "running": w.running, "waiting": w.waiting,
                     "kv_cache_usage": w.kv_cache_usage, "breaker": w.breaker.state.name.lower(),
                     "queued": w.gate.waiting}
            for w in registry.workers.values()
        }
        # Ready while some worker can take requests: its health check passes and its breaker is not open.
        ready = any(w.health is Health.UP and w.available() for w in registry.workers.values())
        return JSONResponse({"ready": ready, "workers": workers}, status_code=200 if ready else 503)

    @app.get("/ui", summary="Status page: routing mix, cost and savings, latency, worker health",
             response_class=HTMLResponse, responses=doc.TEXT_RESPONSES)
    async def ui() -> Response:
        return Response(UI_PAGE.read_bytes(), media_type="text/html; charset=utf-8")

    @app.get("/ui/status.json", summary="The status page's numbers", responses=doc.STATUS_RESPONSES)
    async def ui_status(request: Request) -> JSONResponse:
        state = gw(request)
        return JSONResponse(state.status.snapshot(state.live))

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
             responses=doc.TEXT_RESPONSES)
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(gw(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
