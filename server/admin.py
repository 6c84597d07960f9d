"""The gateway's own endpoints beyond the OpenAI protocol: explain a route, take feedback, reload config."""

from __future__ import annotations

import hmac
import logging
import os
import uuid
from typing import Annotated, Any

import orjson
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.responses import Response

from routers.base import RoutingDecision
from server.config import ConfigError, KeyConfig, field_path
from server.errors import GatewayError, bad_request, error_response
from server.hardening import check_limits
from server.keys import forbidden
from server.keystore import add_key, authenticate, list_keys, revoke_key
from server.protocol import ChatCompletionRequest, validate_body
from server.proxy import decode_json, read_body, route_input
from server.routing import explicit_policy, select
from server.state import GatewayState
from server.store import StoreUnavailable

log = logging.getLogger("turnout.admin")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


def decision_json(d: RoutingDecision) -> dict[str, Any]:
    """A decision as the explain endpoint shows it: every candidate's predictions, best first."""
    return {
        "policy": d.policy, "artifact": d.version, "chosen": d.chosen, "reason": d.reason,
        "candidates": [{"name": c.name, "score": c.score, "predicted_quality": c.predicted_quality,
                        "predicted_cost_usd": c.predicted_cost_usd} for c in d.ranking],
    }


async def handle_route(request: Request, gw: GatewayState) -> Response:
    """`POST /v1/route`: the decision for a chat request, computed exactly as for a real one, without
    calling a worker or remembering anything for the session."""
    live = gw.live
    request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    try:
        key = await authenticate(live.keys, gw.guard, gw.stored_keys, request.headers.get("authorization"))
        body = decode_json(await read_body(request, live.config.server.max_body_bytes))
        req = validate_body(ChatCompletionRequest, body)
        assert isinstance(req, ChatCompletionRequest)
        check_limits(body, live.config.server)
        inp = route_input(request, body, req)
        policy = live.table.policy_for(inp.model, explicit_policy(inp))
        if key is not None and policy is not None and not key.allows_policy(policy):
            raise forbidden(f"Key '{key.name}' may not use policy '{policy}'.", "model")
        sel = await select(live.table, live.registry, gw.embedding, gw.affinity, inp, request_id, dry_run=True)
    except GatewayError as err:
        return error_response(err, {"x-turnout-request-id": request_id})
    out: dict[str, Any] = {"object": "turnout.route", "request_id": request_id, "model": sel.target,
                           "policy": sel.policy, "config_generation": live.generation}
    if sel.decision is None:
        out["reason"] = f"model '{sel.target}' names a worker or model directly; no policy applies"
    else:
        out.update(decision_json(sel.decision))
        out["routing_ms"] = round(sel.routing_s * 1000, 3)
        out["embedding_cached"] = sel.embed_cached
        out["affinity"] = sel.affinity
        # The candidates this policy has that were left out because no worker for them is up.
        out["unavailable"] = [t for t in sel.router.targets() if not live.registry.usable(t)] if sel.router else []
    out["workers"] = [{"name": w.name, "health": w.health.value, "load": w.load()}
                      for w in live.registry.resolve(sel.target)]
    out["shadow"] = decision_json(sel.shadow) if sel.shadow is not None else None
    return _json(out, headers={"x-turnout-request-id": request_id})


class FeedbackBody(BaseModel):
    """`POST /v1/feedback` body."""

    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(min_length=1, max_length=200)
    score: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


async def handle_feedback(request: Request, gw: GatewayState) -> Response:
    """`POST /v1/feedback {request_id, score}`: 200 accepted (or ignored as a repeat), 404 for an id not
    routed here or too long ago, 400 for a bad body."""
    try:
        await authenticate(gw.live.keys, gw.guard, gw.stored_keys, request.headers.get("authorization"))
        raw = decode_json(await read_body(request, 64 * 1024))
        try:
            fb = FeedbackBody.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            param = field_path(tuple(first["loc"])) or None
            raise bad_request(f"Invalid value for '{param or 'body'}': {first['msg']}", param) from None
        result, policy = await gw.feedback.give(fb.request_id, fb.score, dict(gw.live.table.routers))
    except GatewayError as err:
        return error_response(err)
    if result == "unknown":
        gw.metrics.feedback.labels("", "unknown").inc()
        return error_response(GatewayError(
            404, f"No routed request '{fb.request_id}' is open for feedback (unknown, or older than "
            f"{gw.feedback.ttl_s:g} s).", param="request_id", code="request_not_found"))
    gw.metrics.feedback.labels(policy or "", result).inc()
    if result == "duplicate":
        return _json({"status": "ignored", "reason": "feedback for this request was already given",
                      "request_id": fb.request_id, "policy": policy})
    return _json({"status": "accepted", "request_id": fb.request_id, "policy": policy})


def _admin_key_problem(request: Request, gw: GatewayState) -> GatewayError | None:
    env = gw.config.server.admin_key_env
    expected = os.environ.get(env)
    if not expected:
        return GatewayError(403, f"Admin endpoints are disabled: set {env} in the gateway's environment.",
                            type="permission_error", code="admin_disabled")
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-turnout-admin-key", "")
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        return GatewayError(401, "Missing or wrong admin key (Authorization: Bearer <key>).",
                            type="authentication_error", code="invalid_admin_key")
    return None


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
    problem = _admin_key_problem(request, gw)
    if problem is not None:
        return error_response(problem)
    try:
        live = await gw.reload()
    except ConfigError as exc:
        gw.metrics.reloads.labels("rejected").inc()
        message = f"{exc.source}: {len(exc.problems)} problem(s); still serving generation {gw.live.generation}."
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_config", "problems": exc.problems}}
        return _json(body, status=400)
    gw.metrics.reloads.labels("ok").inc()
    cfg = live.config
    return _json({"status": "reloaded", "generation": live.generation, "default_policy": cfg.default_policy,
                  "policies": {name: getattr(r, "version", "static") or "static"
                               for name, r in live.table.routers.items()},
                  "workers": [w.name for w in cfg.workers]})


def _key_json(k: KeyConfig, source: str) -> dict[str, Any]:
    rules = k.model_dump(exclude={"key_sha256", "key_env"})
    return {**rules, "source": source}


async def handle_keys(request: Request, gw: GatewayState, name: str | None = None) -> Response:
    """`GET /admin/keys` (every key's rules, never a key or its hash), `POST /admin/keys` (a new stored key:
    its rules in the body; the key is in the answer, once), `DELETE /admin/keys/{name}` (revoke a stored key).
    Admin key required; the store must be reachable."""
    problem = _admin_key_problem(request, gw)
    if problem is not None:
        return error_response(problem)
    try:
        if request.method == "GET":
            stored = await list_keys(gw.store)
            return _json({"keys": [_key_json(k, "config") for k in gw.config.auth.keys]
                          + [_key_json(k, "store") for k in stored]})
        if request.method == "DELETE":
            assert name is not None
            if not await revoke_key(gw.store, name):
                raise GatewayError(404, f"No stored key named '{name}' (keys from the config are revoked by "
                                        "editing it).", code="key_not_found")
            return _json({"revoked": name})
        raw = decode_json(await read_body(request, 64 * 1024))
        if not isinstance(raw, dict) or "key_sha256" in raw or "key_env" in raw:
            raise bad_request("Send the key's rules as a JSON object (name, policies, models, requests_per_minute, "
                              "tokens_per_minute, budget_usd, budget_period); the gateway makes the key.")
        try:
            rules = KeyConfig.model_validate({**raw, "key_sha256": "0" * 64})
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            param = field_path(tuple(first["loc"])) or None
            raise bad_request(f"Invalid value for '{param or 'body'}': {first['msg']}", param) from None
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
        return _json({"name": rules.name, "key": key}, status=201)
    except StoreUnavailable as exc:
        return error_response(GatewayError(503, f"The key store is unavailable: {exc}", type="server_error",
                                           code="state_unavailable"))
    except GatewayError as err:
        return error_response(err)
