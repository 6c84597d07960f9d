"""Admin endpoints (admin key required): `POST /admin/reload` and the stored client keys (`/admin/keys`)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.responses import Response

from server.api.body import read_json
from server.api.credentials import admin_key_problem
from server.api.protocol import invalid_body
from server.api.responses import json_response
from server.config import ConfigError, KeyConfig
from server.errors import GatewayError, bad_request, error_response
from server.gateway import GatewayState
from server.quota.keystore import add_key, list_keys, revoke_key
from server.store.base import StoreUnavailable

log = logging.getLogger("turnout.admin")


async def reload_and_log(gw: GatewayState, trigger: str) -> None:
    """Reload from the config file, logging the outcome (SIGHUP has nobody to answer)."""
    try:
        live = await gw.reload()
    except ConfigError as exc:
        gw.metrics.reloads.labels("rejected").inc()
        log.error("%s: config reload rejected, still serving generation %d: %s", trigger, gw.live.generation, exc)
        return
    except Exception:
        gw.metrics.reloads.labels("failed").inc()
        log.exception("%s: config reload failed, still serving generation %d", trigger, gw.live.generation)
        return
    gw.metrics.reloads.labels("ok").inc()
    log.info("%s: config generation %d in force", trigger, live.generation)


async def handle_reload(request: Request, gw: GatewayState) -> Response:
    """`POST /admin/reload`: re-read the config file and swap it in atomically; 400 listing every problem
    (the running config keeps serving) when it is invalid."""
    problem = admin_key_problem(request, gw)
    if problem is not None:
        return error_response(problem)
    try:
        live = await gw.reload()
    except ConfigError as exc:
        gw.metrics.reloads.labels("rejected").inc()
        message = f"{exc.source}: {len(exc.problems)} problem(s); still serving generation {gw.live.generation}."
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_config", "problems": exc.problems}}
        return json_response(body, status=400)
    gw.metrics.reloads.labels("ok").inc()
    cfg = live.config
    return json_response({"status": "reloaded", "generation": live.generation, "default_policy": cfg.default_policy,
                  "policies": {name: getattr(r, "version", "static") or "static"
                               for name, r in live.table.routers.items()},
                  "workers": [w.name for w in cfg.workers]})


def _keyjson_response(k: KeyConfig, source: str) -> dict[str, Any]:
    rules = k.model_dump(exclude={"key_sha256", "key_env"})
    return {**rules, "source": source}


async def handle_keys(request: Request, gw: GatewayState, name: str | None = None) -> Response:
    """`GET /admin/keys` (every key's rules, never a key or its hash), `POST /admin/keys` (a new stored key:
    its rules in the body; the key is in the answer, once), `DELETE /admin/keys/{name}` (revoke a stored key).
    Admin key required; the store must be reachable."""
    problem = admin_key_problem(request, gw)
    if problem is not None:
        return error_response(problem)
    try:
        if request.method == "GET":
            stored = await list_keys(gw.store)
            return json_response({"keys": [_keyjson_response(k, "config") for k in gw.config.auth.keys]
                          + [_keyjson_response(k, "store") for k in stored]})
        if request.method == "DELETE":
            assert name is not None
            if not await revoke_key(gw.store, name):
                raise GatewayError(404, f"No stored key named '{name}' (keys from the config are revoked by "
                                        "editing it).", code="key_not_found")
            return json_response({"revoked": name})
        raw = await read_json(request, 64 * 1024)
        if not isinstance(raw, dict) or "key_sha256" in raw or "key_env" in raw:
            raise bad_request("Send the key's rules as a JSON object (name, policies, models, requests_per_minute, "
                              "tokens_per_minute, budget_usd, budget_period); the gateway makes the key.")
        try:
            rules = KeyConfig.model_validate({**raw, "key_sha256": "0" * 64})
        except ValidationError as exc:
            raise invalid_body(exc) from None
        unknown = [p for p in rules.policies if p not in gw.config.policies]
        unknown += [m for m in rules.models if m not in gw.live.registry.workers and m not in gw.live.registry.by_model]
        if unknown:
            raise bad_request(f"Unknown policies or models: {unknown}.", "policies")
        if any(k.name == rules.name for k in gw.config.auth.keys):
            raise GatewayError(409, f"A key named '{rules.name}' is in the config.", code="key_exists")
        try:
            key = await add_key(gw.store, rules)
        except ValueError as exc:
            raise GatewayError(409, str(exc), code="key_exists") from None
        return json_response({"name": rules.name, "key": key}, status=201)
    except StoreUnavailable as exc:
        return error_response(GatewayError(503, f"The key store is unavailable: {exc}", type="server_error",
                                           code="state_unavailable"))
    except GatewayError as err:
        return error_response(err)


async def handle_revoke(request: Request, gw: GatewayState) -> Response:
    """`DELETE /admin/keys/{name}`. The name is read from the path here, not taken as a parameter: FastAPI
    would document a 422 for it, which this gateway never answers (its validation errors are 400s)."""
    return await handle_keys(request, gw, request.path_params["name"])
