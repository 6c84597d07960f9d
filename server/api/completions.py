"""The request pipeline of every API relayed to workers: OpenAI's chat and text completions and Responses,
Anthropic's Messages (and its token count), and the pooling endpoints `/v1/embeddings`, `/v1/rerank` and
`/v1/score`. Read and validate the body, authenticate, admit (limits and the budget's hold), route (a pooling
request goes to the pooling worker its model names; a Responses follow-up to the worker holding its conversation),
forward (retries and fallbacks), respond. The request's `RequestLife` ends it, streaming or not
(`server.api.lifecycle`). Errors take the shape of the endpoint's API (`Endpoint.dialect`)."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from server.api.body import read_json_bytes, until_disconnect
from server.api.intake import take_in_async
from server.api.lifecycle import LifeParts, RequestLife
from server.api.prompts import prompt_text
from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CountTokensRequest,
    EmbeddingRequest,
    MessagesRequest,
    OpenAIRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
)
from server.api.stored_responses import follow_up_failure, owner_of, remember_owner
from server.errors import Dialect, GatewayError, bad_request, error_response, internal_error
from server.gateway import GatewayState
from server.outcome import Outcome
from server.policy.selection import (
    POLICY_TEXT_CHARS,
    SESSION_HEADER,
    RouteInput,
    candidate_targets,
    explicit_policy,
    fallback_targets,
    select,
)
from server.policy.table import POLICY_HEADER
from server.quota.admission import (
    CHAT_LENGTH,
    COMPLETION_LENGTH,
    MESSAGES_LENGTH,
    NO_ANSWER,
    RESPONSES_LENGTH,
    AnswerLength,
    Bounds,
    admit,
    allowed_candidates,
    bound_answer,
    check_access,
    keep_within_hold,
    within_budget,
)
from server.quota.keys import KeyRecord
from server.quota.keystore import authenticate, presented_key
from server.snapshot import Live, target_names
from server.telemetry.record import Exchange
from server.telemetry.tracing import OPERATIONS, detach, request_span
from server.upstream.forward import Call
from server.upstream.shapes import CHAT, MESSAGES, RESPONSES, StreamShape

log = logging.getLogger("turnout.completions")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint relayed to workers: the worker's path, the schema its body is validated with, and how its API
    differs: pooling (named directly, never by a policy), the fields bounding its answer's length (none: it
    generates nothing), its stream's shape, and the API whose error shape its clients read."""

    kind: str  # the request log's `endpoint`: "chat", "completions", "responses", "messages", "embeddings", ...
    path: str
    schema: type[OpenAIRequest]
    pooling: bool = False
    length: AnswerLength = CHAT_LENGTH
    shape: StreamShape = CHAT
    dialect: Dialect = "openai"
    metered: bool = True  # False: the answer costs nothing (counting tokens generates none and is free)


CHAT_EP = Endpoint("chat", "/chat/completions", ChatCompletionRequest)
COMPLETIONS = Endpoint("completions", "/completions", CompletionRequest, length=COMPLETION_LENGTH)
RESPONSES_EP = Endpoint("responses", "/responses", ResponsesRequest, length=RESPONSES_LENGTH, shape=RESPONSES)
MESSAGES_EP = Endpoint("messages", "/messages", MessagesRequest, length=MESSAGES_LENGTH, shape=MESSAGES,
                       dialect="anthropic")
COUNT_TOKENS = Endpoint("count_tokens", "/messages/count_tokens", CountTokensRequest, length=NO_ANSWER,
                        dialect="anthropic", metered=False)
EMBEDDINGS = Endpoint("embeddings", "/embeddings", EmbeddingRequest, pooling=True, length=NO_ANSWER)
RERANK = Endpoint("rerank", "/rerank", RerankRequest, pooling=True, length=NO_ANSWER)
SCORE = Endpoint("score", "/score", ScoreRequest, pooling=True, length=NO_ANSWER)


def route_input(request: Request, body: dict[str, Any], req: OpenAIRequest, key: KeyRecord | None) -> RouteInput:
    """What routing needs from a validated request: the text a policy reads (the last user message; see
    `prompt_text`), the per-request routing choices, and the session for affinity. Sessions are named by
    clients, so a session is the key's own: another key naming the same session neither joins it nor learns
    where it is pinned."""
    session = request.headers.get(SESSION_HEADER) or req.session()
    if session and key is not None:
        session = f"{key.name}\x00{session}"
    return RouteInput(model=req.model, text=prompt_text(body)[:POLICY_TEXT_CHARS], options=req.turnout,
                      header_policy=request.headers.get(POLICY_HEADER), session=session or None)


async def handle_completion(endpoint: Endpoint, request: Request, gw: GatewayState) -> Response:
    """Serve one completion request; whatever happens, the response it returns ends its lifecycle."""
    ex = Exchange(request_id=getattr(request.state, "request_id", None) or uuid.uuid4().hex, endpoint=endpoint.kind)
    life = RequestLife(ex, LifeParts(gw.recorder, gw.metrics.in_flight, gw.feedback, gw.limits, gw.spawn))
    traced = request_span(endpoint.kind, request.method, request.url.path, request.headers)
    if traced is not None:
        life.span = traced[0]
    try:
        return await _serve(endpoint, request, gw, life)
    except ClientDisconnect:
        ex.status, ex.http_status = Outcome.CLIENT_DISCONNECT, 499
        return life.respond_empty(499)
    except GatewayError as err:
        ex.status, ex.http_status, ex.error = err.outcome, err.status, err.log_message()
        err.dialect = endpoint.dialect
        return life.respond_error(error_response(err, {**ex.headers(), **retry_advice(err)}))
    except Exception:
        log.exception("request %s failed in the gateway", ex.request_id)
        ex.status, ex.http_status, ex.error = Outcome.INTERNAL_ERROR, 500, "internal error (see the gateway's log)"
        bug = internal_error()
        bug.dialect = endpoint.dialect
        return life.respond_error(error_response(bug, ex.headers()))
    except BaseException:  # cancelled before any response: the request still ends, once
        await life.end()
        raise
    finally:
        if traced is not None:  # the span stays open until the request ends (a stream, later)
            detach(traced[1])


async def _serve(endpoint: Endpoint, request: Request, gw: GatewayState, life: RequestLife) -> Response:
    """The pipeline's steps in order (see the module docstring)."""
    ex = life.ex
    live = gw.live  # one snapshot for the whole request, whatever a reload does meanwhile
    srv = live.config.server
    # Who is asking comes first: a client without a valid key costs the gateway no body read, parse or check.
    key = await authenticate(live.keys, gw.guard, gw.stored_keys, presented_key(request.headers))
    body, req = await take_in_async(await read_json_bytes(request, srv.max_body_bytes), endpoint.schema, srv)
    ex.requested_model = req.model
    ex.stream = bool(req.stream)
    ex.reference_price = live.config.reference[1]
    if srv.log_prompts:
        ex.prompt_log = next((body[f] for f in ("messages", "prompt", "input") if f in body), None)
        ex.completion_parts = []
    body.pop("turnout", None)  # the gateway's own field; workers never see it
    inp = route_input(request, body, req, key)
    bounds = Bounds(endpoint.length)
    follow_up = body.get("previous_response_id") if endpoint is RESPONSES_EP else None
    if follow_up is not None:  # the conversation lives in one worker's memory: it goes there, whatever the model
        worker, owner = await owner_of(gw, live, key, follow_up)
        inp = dataclasses.replace(inp, model=worker.name, options=None, header_policy=None)
        bounds = Bounds(endpoint.length, carried_tokens=owner.tokens)
    if live.table.policy_for(inp.model, explicit_policy(inp)) is None:
        check_worker_kind(live, inp.model, endpoint)
    elif endpoint.pooling:
        raise bad_request(f"/v1{endpoint.path} is not routed by a policy: name an embedding or scoring model (a "
                          f"worker of kind 'pooling'), not '{inp.model}'.", "model")
    if key is not None:
        inp = await _admit(gw, live, key, inp, body, life, bounds, follow_up is not None)
    selection = await select(live.table, live.registry, gw.embedding, gw.affinity, inp, ex.request_id)
    life.routed(selection)
    call = Call(fallback_targets(selection, live.registry, srv.max_fallbacks), endpoint.path, body,
                shape=endpoint.shape, operation=OPERATIONS.get(endpoint.kind, endpoint.kind))
    if ex.stream and endpoint.shape is CHAT:
        client_opts = body.get("stream_options") or {}
        call.wants_usage = bool(client_opts.get("include_usage"))
        # Always ask for usage, for accounting; the usage chunk is relayed only if the client asked.
        body["stream_options"] = {**client_opts, "include_usage": True}
    remembers = endpoint is RESPONSES_EP and body.get("store") is not False
    if remembers:
        call.on_response_id = remember_owner(gw, live, ex)
    if life.admission is not None:
        call.targets = keep_within_hold(gw.limits, life.admission, call.targets, gw.spawn)
    try:
        result = await until_disconnect(request, gw.forwarder.send(live.registry, call, ex))
    except GatewayError as err:
        raise err if follow_up is None else follow_up_failure(err, follow_up, inp.model) from None
    if result is None:
        ex.status, ex.http_status = Outcome.CLIENT_DISCONNECT, 499
        return life.respond_empty(499)  # nobody is listening any more
    if not endpoint.metered:
        ex.set_usage({"input_tokens": 0, "output_tokens": 0}, None)
        ex.cost_usd = 0.0
    if remembers and ex.response_id is not None and call.on_response_id is not None and not ex.stream:
        await call.on_response_id(ex.response_id)
    return life.respond(result)


def retry_advice(err: GatewayError) -> dict[str, str]:
    """`x-should-retry`, which the openai and anthropic SDKs obey over their own rules (they retry 409, 429 and
    5xx twice by default). A failure the gateway already retried and fell back on (a worker unreachable, timed
    out, answering 5xx) gains nothing from the SDK sending it again at once: `false`, so one call is not three
    times the gateway's tries at the workers. A 503 with `Retry-After` (overloaded, no healthy worker yet) and a
    429 may pass if waited for: the SDK's own rules apply. A 409 for a stored response's worker: `false`."""
    if err.status == 409 or (err.status >= 500 and "retry-after" not in err.headers):
        return {"x-should-retry": "false"}
    return {}


def check_worker_kind(live: Live, model: str, endpoint: Endpoint) -> None:
    """A model named directly must be served by workers of the endpoint's kind: 400 otherwise (a generation
    server has no embeddings, a pooling server no completions)."""
    kinds = {w.config.kind for w in live.registry.resolve(model)}
    if endpoint.pooling and "pooling" not in kinds:
        raise bad_request(f"'{model}' is served by generation workers; /v1{endpoint.path} needs an embedding or "
                          "scoring model (a worker of kind 'pooling').", "model")
    if not endpoint.pooling and kinds == {"pooling"}:
        raise bad_request(f"'{model}' is an embedding model (its workers are of kind 'pooling'): it serves "
                          "/v1/embeddings, /v1/rerank and /v1/score only.", "model")


async def _admit(gw: GatewayState, live: Live, key: KeyRecord, inp: RouteInput, body: dict[str, Any],
                 life: RequestLife, bounds: Bounds, follow_up: bool = False) -> RouteInput:
    """A keyed request's admission: what it may use (403), its limits and budget hold (429); routing then keeps
    within what the hold covers. `bounds`: how the request's worst case is read (the answer gets a length bound
    when the key needs one). A Responses follow-up (`follow_up`) continues a conversation this key was allowed to
    start (its owner was checked), on the one worker holding it: no other access check applies."""
    policy = live.table.policy_for(inp.model, explicit_policy(inp))
    if not follow_up:
        check_access(key, policy, *target_names(live, inp.model))
    if policy is not None:
        inp = allowed_candidates(key, inp, candidate_targets(live.table, live.registry, inp),
                                 lambda t: target_names(live, t))
    bound_answer(key, body, live.config.server.default_max_tokens, bounds)
    prices = {}
    if key.config.budget_usd is not None:
        prices = {t: live.registry.resolve(t)[0].config.price
                  for t in candidate_targets(live.table, live.registry, inp)}
    adm = await admit(gw.limits, key, body, prices, bounds)
    life.hold(adm)
    life.ex.key = key.name
    return within_budget(inp, adm)


def relay_handler(endpoint: Endpoint) -> Callable[[Request, GatewayState], Awaitable[Response]]:
    """The route handler of an endpoint relayed to workers (`server.app`'s route table names one per path)."""
    async def handle(request: Request, gw: GatewayState) -> Response:
        return await handle_completion(endpoint, request, gw)
    handle.__doc__ = f"`POST /v1{endpoint.path}`."
    return handle
