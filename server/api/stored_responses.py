"""The Responses API's stored responses, which live in the memory of the worker that made them: a follow-up by
`previous_response_id`, `GET /v1/responses/{id}` and `POST /v1/responses/{id}/cancel` go to that worker and no
other (`server.upstream.owners` remembers which). Only the key that made a response may reach it; for any other
key it does not exist (404, as an unknown id). When its worker is no longer configured: 404 saying so; when it
cannot be reached: 409, since no other worker could answer instead."""

from __future__ import annotations

import asyncio

from fastapi import Request
from starlette.responses import Response

from server.errors import GatewayError, bad_request, error_response, from_upstream_failure, from_upstream_status
from server.gateway import GatewayState
from server.outcome import Outcome
from server.quota.keys import KeyRecord
from server.quota.keystore import authenticate, presented_key
from server.snapshot import Live
from server.telemetry.record import Exchange
from server.upstream.client import UpstreamFailure
from server.upstream.owners import Owner
from server.upstream.relay import OnResponseId
from server.upstream.workers import Worker

#: The failures that mean a response's worker cannot answer now (it is down, or refuses connections).
_GONE = frozenset({Outcome.UPSTREAM_UNREACHABLE, Outcome.NO_HEALTHY_WORKER})


def unknown_response(response_id: str) -> GatewayError:
    """404: no response of this id was made here for this key (or it was made too long ago)."""
    return GatewayError(404, f"Response with id '{response_id}' not found (unknown to this gateway, made with "
                             "another key, or older than server.response_owner_ttl_s).",
                        param="response_id", code="response_not_found")


def worker_unavailable(response_id: str, worker: str, why: str) -> GatewayError:
    """409: the response's worker, the only one holding it, cannot be reached now."""
    return GatewayError(409, f"Response '{response_id}' is held by worker '{worker}', which {why}; no other worker "
                             "holds it. Retry later, or start a new conversation without previous_response_id.",
                        param="response_id", code="response_worker_unavailable")


async def owner_of(gw: GatewayState, live: Live, key: KeyRecord | None, response_id: str) -> tuple[Worker, Owner]:
    """The worker holding `response_id`, and what was remembered of it, for this key (see the module docstring
    for the 404 and 409)."""
    owner = await gw.response_owners.get(response_id)
    if owner is None or owner.key != (key.name if key is not None else None):
        raise unknown_response(response_id)
    worker = live.registry.workers.get(owner.worker)
    if worker is None:
        raise GatewayError(404, f"Response '{response_id}' was made by worker '{owner.worker}', which is no longer "
                                "configured: the response went with it.",
                           param="response_id", code="response_not_found")
    if not live.registry.usable(worker.name):
        raise worker_unavailable(response_id, worker.name, "is down or its breaker is open")
    return worker, owner


def remember_owner(gw: GatewayState, live: Live, ex: Exchange) -> OnResponseId:
    """What a Responses request calls with its answer's id: remember the worker (and key) that made it, with the
    conversation's tokens so far."""
    async def remember(response_id: str) -> None:
        if ex.worker is None:
            return
        tokens = (ex.prompt_tokens or 0) + (ex.completion_tokens or 0)
        await gw.response_owners.put(response_id, Owner(ex.worker, ex.key, tokens),
                                     live.config.server.response_owner_ttl_s)
    return remember


def follow_up_failure(err: GatewayError, response_id: str, worker: str) -> GatewayError:
    """A follow-up's failure, said as the 409 it is when the one worker that could answer is gone."""
    if err.outcome in _GONE:
        return worker_unavailable(response_id, worker, "cannot be reached")
    return err


async def handle_get_response(request: Request, gw: GatewayState) -> Response:
    """`GET /v1/responses/{response_id}`: the stored response, from the worker that holds it."""
    return await _relay(request, gw, "GET", "")


async def handle_cancel_response(request: Request, gw: GatewayState) -> Response:
    """`POST /v1/responses/{response_id}/cancel`: cancel it on the worker that holds it."""
    return await _relay(request, gw, "POST", "/cancel")


async def _relay(request: Request, gw: GatewayState, method: str, suffix: str) -> Response:
    response_id = request.path_params["response_id"]
    live = gw.live
    try:
        if request.query_params.get("stream", "false").lower() not in ("false", "0", ""):
            raise bad_request("Streaming a stored response is for background responses, which this gateway does "
                              "not relay; retrieve it without stream.", "stream")
        key = await authenticate(live.keys, gw.guard, gw.stored_keys, presented_key(request.headers))
        worker, _ = await owner_of(gw, live, key, response_id)
        url = f"{worker.config.base_url}/responses/{response_id}{suffix}"
        try:
            to = worker.timeouts
            async with asyncio.timeout(to.total_s):
                resp = await gw.client.send(method, url, params=dict(request.query_params),
                                            headers={"accept-encoding": "identity", **worker.auth_headers},
                                            timeouts=to.for_client())
        except UpstreamFailure as exc:
            if exc.kind == "busy":  # the gateway's own pool is full: retry shortly, the worker is not at fault
                raise from_upstream_failure(exc.kind, worker.name) from None
            raise worker_unavailable(response_id, worker.name, "cannot be reached") from None
        except TimeoutError:
            raise worker_unavailable(response_id, worker.name, "cannot be reached") from None
        if not 200 <= resp.status < 300:
            raise from_upstream_status(worker.name, resp.status, resp.content)
    except GatewayError as err:
        return error_response(err)
    return Response(resp.content, status_code=resp.status, media_type="application/json",
                    headers={"x-turnout-model": worker.name})
