"""Read-only endpoints for operators and clients: models, liveness, readiness, metrics, the status page."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from server.api.credentials import ops_problem
from server.errors import GatewayError, error_response
from server.gateway import GatewayState
from server.quota.admission import check_access
from server.quota.keys import KeyRecord
from server.quota.keystore import authenticate, presented_key
from server.snapshot import Live, target_names
from server.upstream.workers import Health

UI_PAGE = Path(__file__).resolve().parent.parent / "ui" / "index.html"


async def handle_models(request: Request, gw: GatewayState) -> Response:
    """`GET /v1/models`: served models, `auto`, and every policy as `turnout/<policy>`. With client keys on, a key
    is needed (401) and sees only what it may use."""
    live = gw.live
    try:
        key = await authenticate(live.keys, gw.guard, gw.stored_keys, presented_key(request.headers))
    except GatewayError as err:
        return error_response(err)
    created = int(getattr(request.app.state, "started_at", time.time()))
    ids = live.table.model_ids()
    if key is not None:
        ids = [m for m in ids if _may_use(key, live, m)]
    data = [{"id": mid, "object": "model", "created": created, "owned_by": "turnout"} for mid in ids]
    return JSONResponse({"object": "list", "data": data})


def _may_use(key: KeyRecord, live: Live, model_id: str) -> bool:
    """Whether `key` may send requests naming `model_id` (a model, `auto` or `turnout/<policy>`)."""
    policy = live.table.policy_for(model_id, None)
    try:
        check_access(key, policy, *target_names(live, model_id))
    except GatewayError:
        return False
    # A policy is usable when the key may reach one of its candidates (the rest are cut: see allowed_candidates).
    return policy is None or any(key.allows_model(*target_names(live, t)) for t in live.table.routers[policy].targets())


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
    """`GET /ui/status.json`: the status page's numbers (with client keys on, the operations token is needed)."""
    problem = ops_problem(request, gw)
    if problem is not None:
        return error_response(problem)
    return JSONResponse(gw.status.snapshot(gw.live.reading()))


async def handle_metrics(request: Request, gw: GatewayState) -> Response:
    """`GET /metrics`: Prometheus metrics (with client keys on, the operations token is needed)."""
    problem = ops_problem(request, gw)
    if problem is not None:
        return error_response(problem)
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
