"""`POST /v1/feedback`: a client's score (0..1) for a routed request's answer, for the policies that learn."""

from __future__ import annotations

from typing import Annotated

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.responses import Response

from server.api.body import read_json
from server.api.protocol import invalid_body
from server.api.responses import json_response
from server.errors import GatewayError, error_response
from server.gateway import GatewayState
from server.quota.keystore import authenticate, presented_key


class FeedbackBody(BaseModel):
    """`POST /v1/feedback` body."""

    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(min_length=1, max_length=200)
    score: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


async def handle_feedback(request: Request, gw: GatewayState) -> Response:
    """`POST /v1/feedback {request_id, score}`: 200 accepted (or ignored as a repeat), 404 for an id not
    routed here, routed for another key, or too long ago, 400 for a bad body, 429 past the key's requests per minute."""
    try:
        key = await authenticate(gw.live.keys, gw.guard, gw.stored_keys, presented_key(request.headers))
        raw = await read_json(request, 64 * 1024)
        try:
            fb = FeedbackBody.model_validate(raw)
        except ValidationError as exc:
            raise invalid_body(exc) from None
        if key is not None:  # one of the key's requests per minute (no tokens, no budget), like any other call
            await gw.limits.admit(key, 0, {})
        result, policy = await gw.feedback.give(fb.request_id, fb.score, dict(gw.live.table.routers),
                                                key.name if key is not None else None)
    except GatewayError as err:
        return error_response(err)
    if result == "unknown":
        gw.metrics.feedback.labels("", "unknown").inc()
        return error_response(GatewayError(
            404, f"No routed request '{fb.request_id}' of this key is open for feedback (unknown, made with another "
            f"key, or older than {gw.feedback.ttl_s:g} s).", param="request_id", code="request_not_found"))
    gw.metrics.feedback.labels(policy or "", result).inc()
    if result == "duplicate":
        return json_response({"status": "ignored", "reason": "feedback for this request was already given",
                              "request_id": fb.request_id, "policy": policy})
    gw.recorder.log_feedback(fb.request_id, fb.score, policy)
    return json_response({"status": "accepted", "request_id": fb.request_id, "policy": policy})
