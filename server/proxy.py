"""Forwarding one chat or text completion to a worker, streaming or not, and accounting for it.

The client's own JSON is forwarded (only `model` and `stream_options` are rewritten), so unknown
fields such as vLLM's extra sampling parameters reach the worker unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import anyio
import httpx
import orjson
from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from routers.base import RoutingOutcome
from server.accounting import Exchange
from server.admission import admit, keep_within_hold, within_budget
from server.config import ReliabilityConfig
from server.errors import (
    GatewayError,
    bad_request,
    error_response,
    from_httpx,
    from_upstream_status,
    payload_too_large,
    upstream_stream_error,
    upstream_timeout,
)
from server.fallback import FALLBACK_CODES, QUEUE_REFUSED, RETRY_CODES, fallback_targets, note_fallback
from server.hardening import check_limits
from server.keystore import authenticate
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    prompt_text,
    validate_body,
)
from server.routing import POLICY_HEADER, SESSION_HEADER, RouteInput, Selection, select
from server.sse import DONE, EventSource, EventSplitter, RelayResponse, event_data
from server.state import GatewayState, Live
from server.workers import Lease, Verdict, Worker

log = logging.getLogger("turnout.proxy")

ENDPOINTS: dict[str, tuple[str, type[ChatCompletionRequest] | type[CompletionRequest]]] = {
    "chat": ("/chat/completions", ChatCompletionRequest),
    "completions": ("/completions", CompletionRequest),
}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise payload_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(raw: bytes) -> Any:
    """Parse a JSON body; 400 with the parser's reason when it is not JSON."""
    if not raw.strip():
        raise bad_request("Request body is empty; expected a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from None


def encode_json(body: dict[str, Any]) -> bytes:
    """Serialise the body to forward; 400 for what JSON parsing accepts but cannot be sent on (nesting
    deeper than the encoder allows)."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise bad_request(f"Request body cannot be forwarded: {exc}") from None


def route_input(request: Request, body: dict[str, Any], req: OpenAIRequest) -> RouteInput:
    """What routing needs from a validated request: the text a policy reads (the last user message; see
    `prompt_text`), the per-request routing choices, and the session for affinity."""
    session = request.headers.get(SESSION_HEADER) or req.user
    return RouteInput(model=req.model, text=prompt_text(body), options=req.turnout,
                      header_policy=request.headers.get(POLICY_HEADER), session=session or None)


def apply_selection(gw: GatewayState, sel: Selection, ex: Exchange) -> None:
    """Note the decision on the exchange, and arrange for the policy to hear the outcome."""
    ex.policy, ex.decision, ex.shadow = sel.policy, sel.decision, sel.shadow
    ex.routing_s, ex.embed_cached, ex.affinity = (sel.routing_s if sel.policy else None), sel.embed_cached, sel.affinity
    ex.embed_s, ex.score_s = sel.embed_s, sel.score_s
    ex.reason = sel.decision.reason if sel.decision else None
    router, decision = sel.router, sel.decision
    if router is None or decision is None:
        return
    # Not awaited: the record is written while the worker answers, long before the client can score the answer.
    record = gw.feedback.make_record(ex.request_id, router, decision.policy, decision.version, decision.chosen)
    gw.spawn(gw.feedback.put(ex.request_id, record))

    def tell_policy(done: Exchange) -> None:
        if done.cost_usd is not None and record.features is not None:  # a bandit's reward uses the cost
            record.cost_usd = done.cost_usd
            gw.spawn(gw.feedback.put(done.request_id, record))
        # The chosen model failed when the request had to fall back, whatever the fallback did.
        ok = done.status == "ok" and not done.fallback_from
        router.observe(RoutingOutcome(request_id=done.request_id, chosen=decision.chosen, ok=ok,
                                      cost_usd=done.cost_usd, latency_s=time.perf_counter() - done.started))

    ex.on_finish.append(tell_policy)


async def handle_completion(kind: str, request: Request, gw: GatewayState) -> Response:
    """Serve `POST /v1/chat/completions` (`kind="chat"`) or `POST /v1/completions`."""
    path, schema = ENDPOINTS[kind]
    ex = Exchange(request_id=getattr(request.state, "request_id", None) or uuid.uuid4().hex, endpoint=kind)
    gw.metrics.in_flight.inc()
    streaming = False
    live = gw.live  # one snapshot for the whole request, whatever a reload does meanwhile
    try:
        body = decode_json(await read_body(request, live.config.server.max_body_bytes))
        req = validate_body(schema, body)
        check_limits(body, live.config.server)
        ex.stream = bool(req.stream)
        ex.reference_price = live.config.reference[1]
        if live.config.server.log_prompts:
            ex.prompt_log = body.get("messages") if kind == "chat" else body.get("prompt")
            ex.completion_parts = []
        body.pop("turnout", None)  # the gateway's own field; workers never see it
        inp = route_input(request, body, req)
        key = await authenticate(live.keys, gw.guard, gw.stored_keys, request.headers.get("authorization"))
        adm = await admit(gw, live, key, inp, body, ex) if key is not None else None
        if adm is not None:
            inp = within_budget(inp, adm)
        selection = await select(live.table, live.registry, gw.embedding, gw.affinity, inp, ex.request_id)
        apply_selection(gw, selection, ex)
        wants_usage = False
        if ex.stream:
            client_opts = body.get("stream_options") or {}
            wants_usage = bool(client_opts.get("include_usage"))
            # Always ask for usage, for accounting; the usage chunk is relayed only if the client asked.
            body["stream_options"] = {**client_opts, "include_usage": True}
        targets = fallback_targets(selection, live.registry, live.config.server.max_fallbacks)
        if adm is not None:
            targets = keep_within_hold(gw, adm, targets)
        response = await _send(gw, live, request, path, body, ex, targets, wants_usage)
        if response is None:
            ex.status, ex.http_status = "client_disconnect", 499
            return Response(status_code=499, headers=ex.headers())  # nobody is listening any more
        streaming = isinstance(response, RelayResponse)
        return response
    except ClientDisconnect:
        ex.status, ex.http_status = "client_disconnect", 499
        return Response(status_code=499, headers=ex.headers())
    except GatewayError as err:
        ex.status = err.status_label()
        ex.http_status, ex.error = err.status, err.log_message()
        return error_response(err, ex.headers())
    except Exception:
        ex.status, ex.http_status, ex.error = "internal_error", 500, "internal error (see the gateway's log)"
        raise
    finally:
        if not streaming:
            gw.metrics.in_flight.dec()
            gw.recorder.finish(ex)


async def _send(gw: GatewayState, live: Live, request: Request, path: str, body: dict[str, Any], ex: Exchange,
                targets: list[str], wants_usage: bool) -> Response | None:
    """Forward to the first target. When its worker fails before anything reached the client: retry the same
    model up to `reliability.retries` times (on another replica when there is one; on the same worker only
    after it was unreachable or answered 5xx), then move to the next target (the policy's fallbacks). Every
    re-send spends from the retry budget.
    None: the client went away."""
    rel = live.config.reliability
    gw.retry_budget.request()
    failed: set[str] = set()  # workers that failed this request
    last: GatewayError | None = None
    last_worker: Worker | None = None  # whose attempt `last` ended (None: no worker was left to pick)
    sent = False  # some worker received this request: a re-send then spends from the retry budget
    for index, target in enumerate(targets):
        for attempt in range(rel.retries + 1):
            try:
                worker = live.registry.pick(target, avoid=frozenset(failed))
            except GatewayError as err:  # nothing left for this target (its breakers opened meanwhile)
                last = last or err  # a worker's own failure stays the reason
                break
            if last is not None:
                if sent and not gw.retry_budget.try_spend():
                    gw.metrics.retry_budget_exhausted.inc()
                    raise last
                if attempt and last_worker is not None:
                    note_retry(gw, ex, last, last_worker, target)
            delay = rel.retry_backoff_s * 2 ** (attempt - 1) * random.random() if attempt else 0.0
            try:
                return await until_disconnect(request, _attempt(gw, rel, worker, path, body, ex, wants_usage,
                                                                delay))
            except GatewayError as err:
                if err.code not in FALLBACK_CODES:
                    raise
                if err.code != QUEUE_REFUSED:  # it reached the worker (the gate's refusal sends nothing)
                    sent = True
                    if gw.metrics.enabled:  # counted here, once per failed exchange, whatever follows it
                        gw.metrics.upstream_errors.labels(worker.name, err.status_label()).inc()
                    ex.failure_counted = True
                last, last_worker = err, worker
                failed.add(worker.name)
                others = any(w.name not in failed for w in live.registry.usable(target))
                if err.code not in RETRY_CODES and not others:
                    break  # a hung or saturated worker would be so again: go to the next target
        if index < len(targets) - 1 and last is not None:
            note_fallback(gw, live.registry, ex, last, target, targets[index + 1])
    assert last is not None  # every path that does not return sets it
    raise last


async def _attempt(gw: GatewayState, rel: ReliabilityConfig, worker: Worker, path: str, body: dict[str, Any],
                   ex: Exchange, wants_usage: bool, delay_s: float) -> Response:
    """One try at `worker`, after `delay_s` (a retry's backoff): hold a place there, send, and tell its breaker
    how it went (a stream's relay does that when the stream ends)."""
    if delay_s:
        await asyncio.sleep(delay_s)
    lease = await Lease.take(worker, rel)
    # The exchange is this worker's from here on (not while queued: a client leaving the line owes nothing).
    ex.worker, ex.model, ex.failure_counted = worker.name, worker.model, False
    body["model"] = worker.model
    payload = encode_json(body)
    try:
        if ex.stream:
            return await _open_stream(gw, lease, path, payload, ex, wants_usage)
        response = await _forward(gw, worker, path, payload, ex)
    except GatewayError as err:
        lease.end("failed" if err.code in FALLBACK_CODES else "neutral" if err.status >= 500 else "ok")
        raise
    except BaseException:
        lease.end("neutral")  # cancelled: the client went away
        raise
    lease.end("ok")
    return response


def note_retry(gw: GatewayState, ex: Exchange, err: GatewayError, failed: Worker, target: str) -> None:
    """Record that the request goes to `target` again after `err`, the failure of worker `failed` (already
    counted in `turnout_upstream_errors` when it reached the worker)."""
    if gw.metrics.enabled:
        gw.metrics.retries.labels(failed.model, err.status_label()).inc()
    ex.retries += 1
    log.warning("request %s: worker %s failed before its first byte (%s); retrying %s", ex.request_id,
                failed.name, err.log_message(), target)


async def until_disconnect(request: Request, work: Coroutine[Any, Any, Response]) -> Response | None:
    """Await `work`, unless the client disconnects first: then cancel it (closing the upstream request,
    so the worker stops generating) and return None. The request body must already have been read.

    One watcher task cancels this task on disconnect; cheaper than a task group per request, which
    measurably added to the gateway's overhead.
    """
    current = asyncio.current_task()
    assert current is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        current.uncancel()  # our own cancellation, consumed here; anything else propagates
        return None
    finally:
        watcher.cancel()


def _upstream_headers(worker: Worker, request_id: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "accept-encoding": "identity",
        "x-request-id": request_id,
        **worker.auth_headers,
    }


async def _forward(gw: GatewayState, worker: Worker, path: str, payload: bytes, ex: Exchange) -> Response:
    """Non-streaming: send, wait for the whole answer (within the worker's total timeout), account, answer."""
    to = worker.timeouts
    t = time.perf_counter()
    try:
        async with asyncio.timeout(to.total_s):
            resp = await gw.client.post(worker.config.base_url + path, content=payload,
                                        headers=_upstream_headers(worker, ex.request_id), timeout=to.for_httpx())
    except TimeoutError:
        raise upstream_timeout(worker.name) from None
    except httpx.HTTPError as exc:
        raise from_httpx(exc, worker.name) from None
    finally:
        ex.upstream_s += time.perf_counter() - t
    if not 200 <= resp.status_code < 300:
        raise from_upstream_status(worker.name, resp.status_code, resp.content)
    try:
        data = orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        raise GatewayError(502, f"Worker '{worker.name}' sent a body that is not JSON.",
                           type="server_error", code="upstream_bad_response") from None
    ex.set_usage(data.get("usage") if isinstance(data, dict) else None, worker.config.price)
    if ex.completion_parts is not None and isinstance(data, dict):
        ex.completion_parts.extend(choice_texts(data))
    ex.http_status = resp.status_code
    return Response(resp.content, status_code=resp.status_code, media_type="application/json",
                    headers=ex.headers())


async def _open_stream(gw: GatewayState, lease: Lease, path: str, payload: bytes, ex: Exchange,
                       wants_usage: bool) -> Response:
    """Streaming: open the upstream stream and wait for its first bytes (within the TTFT timeout) before
    answering the client, so that a worker failing before its first token is retried or falls back like any
    other failure before the first byte. Then the relay owns the upstream response and the lease."""
    worker = lease.worker
    to = worker.timeouts
    request = gw.client.build_request("POST", worker.config.base_url + path, content=payload,
                                      headers=_upstream_headers(worker, ex.request_id), timeout=to.for_httpx())
    deadline = asyncio.get_running_loop().time() + to.total_s
    resp: httpx.Response | None = None
    t = time.perf_counter()
    try:
        async with asyncio.timeout(min(to.ttft_s, to.total_s)):
            resp = await gw.client.send(request, stream=True)
            if resp.status_code != 200:
                try:
                    content = await resp.aread()
                except httpx.HTTPError:
                    content = b""
                raise from_upstream_status(worker.name, resp.status_code, content)
            chunks = resp.aiter_raw()
            first = await anext(chunks, b"")
        if not first:
            raise GatewayError(502, f"Worker '{worker.name}' ended the stream before its first event.",
                               type="server_error", code="upstream_error")
    except BaseException as exc:
        if resp is not None:
            with anyio.CancelScope(shield=True):
                await resp.aclose()
        if isinstance(exc, TimeoutError):
            raise upstream_timeout(worker.name) from None
        if isinstance(exc, httpx.HTTPError):
            raise from_httpx(exc, worker.name) from None
        raise
    finally:
        ex.upstream_s += time.perf_counter() - t
    relay = StreamRelay(gw, lease, resp, chunks, first, deadline, ex, wants_usage)
    ex.freeze_stream_overhead()
    return RelayResponse(relay, headers=ex.headers())


def choice_texts(obj: dict[str, Any]) -> list[str]:
    """The text in a completion object or chunk: each choice's message or delta content, or its text."""
    out: list[str] = []
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        part = choice.get("message") or choice.get("delta")
        text = part.get("content") if isinstance(part, dict) else choice.get("text")
        if isinstance(text, str):
            out.append(text)
    return out


def _chunk_texts(data: bytes) -> list[str]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return []
    return choice_texts(obj) if isinstance(obj, dict) else []


class StreamRelay(EventSource):
    """Relays a worker's SSE stream event by event, takes the usage, and ends every stream properly: a stream
    the worker breaks off, falls silent in (`idle_timeout_s`) or runs past its total time ends with an error
    event and `[DONE]`, never a silent truncation. Owns the upstream response and the worker lease."""

    def __init__(self, gw: GatewayState, lease: Lease, resp: httpx.Response, chunks: AsyncIterator[bytes],
                 first: bytes, deadline: float, ex: Exchange, wants_usage: bool) -> None:
        self._gw, self._lease, self._worker, self._resp, self._ex = gw, lease, lease.worker, resp, ex
        self._chunks, self._first, self._deadline = chunks, first, deadline
        self._wants_usage = wants_usage
        self._closed = False
        self._completed = False
        self._verdict: Verdict = "neutral"

    async def _next(self) -> bytes:
        """The next raw chunk (b"" at the end), within the idle timeout and the total deadline. The timeout
        is only ever around this read, never across a `yield`: a timeout firing while the consumer sends
        would cancel the consumer instead."""
        loop = asyncio.get_running_loop()
        to = self._worker.timeouts
        total_left = self._deadline - loop.time()
        wait = min(to.idle_s, total_left)
        try:
            async with asyncio.timeout(max(0.0, wait)):
                return await anext(self._chunks, b"")
        except TimeoutError:
            what = (f"no event for {to.idle_s:g} s (idle timeout)" if to.idle_s <= total_left
                    else f"the stream ran past {to.total_s:g} s (total timeout)")
            raise upstream_stream_error(self._worker.name, what) from None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        ex = self._ex
        splitter = EventSplitter()
        saw_done = False
        try:
            chunk, self._first = self._first, b""
            while chunk:
                t = time.perf_counter()
                out = bytearray()
                for event in splitter.feed(chunk):
                    data = event_data(event)
                    if data is None:
                        continue
                    if data == DONE:
                        saw_done = True
                    elif not self._keep(data):
                        continue
                    elif ex.completion_parts is not None:
                        ex.completion_parts.extend(_chunk_texts(data))
                    out += event + b"\n\n"
                ex.relay_s += time.perf_counter() - t  # the gateway's own work on this chunk
                if out:
                    if ex.ttft_s is None:
                        ex.ttft_s = time.perf_counter() - ex.started
                    yield bytes(out)
                chunk = await self._next()
            if not saw_done:
                raise upstream_stream_error(self._worker.name, "the stream ended without [DONE]")
            self._verdict = "ok"
        except (httpx.HTTPError, GatewayError) as exc:
            err = exc if isinstance(exc, GatewayError) else upstream_stream_error(
                self._worker.name, type(exc).__name__)
            ex.status, ex.error = "stream_error", err.log_message()
            self._verdict = "failed"
            yield err.sse_event() + b"data: [DONE]\n\n"
        self._completed = True
    def _keep(self, data: bytes) -> bool:
        """Inspect a JSON event: take usage; drop the usage-only chunk unless the client asked for it."""
        if b'"usage"' not in data and b'"error"' not in data:
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        if "error" in obj:
            # The worker's own error event; its message may quote the request, so it is not logged.
            self._ex.status, self._ex.error = "stream_error", "the worker sent an error event"
            return True
        usage = obj.get("usage")
        if usage:
            self._ex.set_usage(usage, self._worker.config.price)
            if not obj.get("choices"):
                return self._wants_usage
        return True

    async def aclose(self) -> None:
        """Close the upstream response (which aborts the worker's request if it is still running) and
        record the exchange; a stream that did not complete is a client disconnect."""
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.CancelScope(shield=True):
                await self._resp.aclose()
        finally:
            self._lease.end(self._verdict)
            if not self._completed and self._ex.status == "ok":
                self._ex.status = "client_disconnect"
            self._gw.metrics.in_flight.dec()
            self._gw.recorder.finish(self._ex)
