"""`POST /v1/route`: explain the routing decision for a chat request without running it."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request
from starlette.responses import Response

from routers.base import RoutingDecision
from server.api.body import read_json_bytes
from server.api.completions import route_input
from server.api.intake import take_in_async
from server.api.protocol import ChatCompletionRequest
from server.api.responses import json_response
from server.errors import GatewayError, error_response
from server.gateway import GatewayState
from server.policy.selection import candidate_targets, explicit_policy, select
from server.quota.admission import allowed_candidates, check_access
from server.quota.keystore import authenticate, presented_key
from server.snapshot import target_names


def decisionjson_response(d: RoutingDecision) -> dict[str, Any]:
    """A decision as the explain endpoint shows it: every candidate's predictions, best first."""
    return {
        "policy": d.policy, "artifact": d.version, "chosen": d.chosen, "reason": d.reason,
        "candidates": [{"name": c.name, "score": c.score, "predicted_quality": c.predicted_quality,
                        "predicted_cost_usd": c.predicted_cost_usd} for c in d.ranking],
    }


async def handle_route(request: Request, gw: GatewayState) -> Response:
    """`POST /v1/route`: the decision for a chat request, computed exactly as for a real one, without
    calling a worker or remembering anything for the session. It counts against the key's requests per minute."""
    live = gw.live
    request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    try:
        key = await authenticate(live.keys, gw.guard, gw.stored_keys, presented_key(request.headers))
        srv = live.config.server
        body, req = await take_in_async(await read_json_bytes(request, srv.max_body_bytes), ChatCompletionRequest,
                                        srv)
        assert isinstance(req, ChatCompletionRequest)
        inp = route_input(request, body, req, key)
        policy = live.table.policy_for(inp.model, explicit_policy(inp))
        if key is not None:  # what the key may reach, as for a real request
            check_access(key, policy, *target_names(live, inp.model))
            # A decision costs the gateway an embedding: it counts as one of the key's requests (no tokens, no
            # budget), so explaining cannot bypass the limits that bound routing work.
            await gw.limits.admit(key, 0, {})
            if policy is not None:
                inp = allowed_candidates(key, inp, candidate_targets(live.table, live.registry, inp),
                                         lambda t: target_names(live, t))
        sel = await select(live.table, live.registry, gw.embedding, gw.affinity, inp, request_id, dry_run=True)
    except GatewayError as err:
        return error_response(err, {"x-turnout-request-id": request_id})
    out: dict[str, Any] = {"object": "turnout.route", "request_id": request_id, "model": sel.target,
                           "policy": sel.policy, "config_generation": live.generation}
    if sel.decision is None:
        out["reason"] = f"model '{sel.target}' names a worker or model directly; no policy applies"
    else:
        out.update(decisionjson_response(sel.decision))
        out["routing_ms"] = round(sel.routing_s * 1000, 3)
        out["embedding_cached"] = sel.embed_cached
        out["affinity"] = sel.affinity
        # The candidates this policy has that were left out because no worker for them is up.
        out["unavailable"] = [t for t in sel.router.targets() if not live.registry.usable(t)] if sel.router else []
    out["workers"] = [{"name": w.name, "health": w.health.value, "load": w.load()}
                      for w in live.registry.resolve(sel.target)]
    out["shadow"] = decisionjson_response(sel.shadow) if sel.shadow is not None else None
    return json_response(out, headers={"x-turnout-request-id": request_id})
