"""Read-only endpoints for operators and clients: models, liveness, readiness, metrics, the status page."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from server.gateway import GatewayState
from server.upstream.workers import Health

UI_PAGE = Path(__file__).resolve().parent.parent / "ui" / "index.html"


async def handle_models(request: Request, gw: GatewayState) -> Response:
    """`GET /v1/models`: served models, `auto`, and every policy as `turnout/<policy>`."""
    created = int(getattr(request.app.state, "started_at", time.time()))
    data = [{"id": mid, "object": "model", "created": created, "owned_by": "turnout"}
            for mid in gw.live.table.model_ids()]
    return JSONResponse({"object": "list", "data": data})


async def handle_healthz(request: Request, gw: GatewayState) -> Response:
    """`GET /healthz`: the process is alive."""
    return JSONResponse({"status": "ok"})


async def handle_readyz(request: Request, gw: GatewayState) -> Response:
    """`GET /readyz`: ready (200) while some worker can take requests: its health check passes and its
    breaker is not open; 503 otherwise. Each worker's state either way."""
    registry = gw.live.registry
    workers = {
        w.name: {"model": w.model, "health": w.health.value, "in_flight": w.in_flight,
                 "error": w.last_error, "running": w.running, "waiting": w.waiting,
                 "kv_cache_usage": w.kv_cache_usage, "breaker": w.breaker.state.name.lower(),
                 "queued": w.gate.waiting}
        for w in registry.workers.values()
    }
    ready = any(w.health is Health.UP and w.available() for w in registry.workers.values())
    return JSONResponse({"ready": ready, "workers": workers}, status_code=200 if ready else 503)


async def handle_ui(request: Request, gw: GatewayState) -> Response:
    """`GET /ui`: the status page (static; it polls `/ui/status.json`)."""
    return Response(UI_PAGE.read_bytes(), media_type="text/html; charset=utf-8")


async def handle_status(request: Request, gw: GatewayState) -> Response:
    """`GET /ui/status.json`: the status page's numbers."""
    return JSONResponse(gw.status.snapshot(gw.live.reading()))


async def handle_metrics(request: Request, gw: GatewayState) -> Response:
    """`GET /metrics`: Prometheus metrics."""
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
