"""Forwarding one request to a worker: pick a replica, hold a place there, send, and on a failure before
anything reached the client retry the same model or fall back to the policy's next candidate.

The client's own JSON is forwarded (only `model` and `stream_options` are rewritten), so unknown fields such
as vLLM's extra sampling parameters reach the worker unchanged. What the caller gets back is data, not an HTTP
response: the whole answer (`Answer`), or a stream whose first bytes have arrived (`Streaming`), which the
request's lifecycle then relays and ends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from server.errors import GatewayError, bad_request, from_upstream_failure, from_upstream_status, upstream_timeout
from server.outcome import Outcome
from server.telemetry.metrics import Metrics
from server.telemetry.record import Exchange
from server.telemetry.tracing import end_upstream, upstream_span
from server.upstream.client import UpstreamClient, UpstreamFailure, UpstreamStream
from server.upstream.relay import OnResponseId, OpenedStream, StreamRelay
from server.upstream.shapes import CHAT, StreamShape, answer_texts
from server.upstream.workers import Lease, Worker, WorkerRegistry

log = logging.getLogger("turnout.forward")


@dataclass(slots=True)
class Call:
    """What to send: the targets in order (the policy's choice, then its fallbacks), the worker path
    (`/chat/completions`, ...), the client's body, whether the client wants a stream's usage chunk, the API
    whose stream the answer is, and who is told a Responses stream's id."""

    targets: list[str]
    path: str
    body: dict[str, Any]
    wants_usage: bool = False
    shape: StreamShape = CHAT
    on_response_id: OnResponseId | None = None
    operation: str = "chat"  # GenAI's operation name, for the call's trace span


@dataclass(slots=True)
class Answer:
    """A worker's whole (non-streamed) answer, already accounted on the exchange."""

    content: bytes
    status: int


@dataclass(slots=True)
class Streaming:
    """A worker's stream that has begun: its relay and the lease on the worker, which whoever ends the
    request must end with the relay's verdict."""

    relay: StreamRelay
    lease: Lease


@dataclass(slots=True)
class _Tries:
    """One request's tries so far: its record, the workers that failed it, the last failure and whose it was."""

    ex: Exchange
    failed: set[str] = field(default_factory=set)
    last: GatewayError | None = None
    last_worker: Worker | None = None  # whose attempt `last` ended (None: no worker was left to pick)
    sent: bool = False  # some worker received this request: a re-send then spends from the retry budget


def encode_json(body: dict[str, Any]) -> bytes:
    """Serialise the body to forward; 400 for what JSON parsing accepts but cannot be sent on (nesting
    deeper than the encoder allows)."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise bad_request(f"Request body cannot be forwarded: {exc}") from None


def _upstream_headers(worker: Worker, request_id: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "accept-encoding": "identity",
        "x-request-id": request_id,
        **worker.auth_headers,
    }


class Forwarder:
    """Sends requests to workers through the one pooled client, counting retries, fallbacks and failed
    exchanges in the metrics."""

    def __init__(self, client: UpstreamClient, metrics: Metrics) -> None:
        self.client, self.metrics = client, metrics

    async def send(self, registry: WorkerRegistry, call: Call, ex: Exchange) -> Answer | Streaming:
        """Forward to the first target. When its worker fails before anything reached the client: retry the
        same model up to `reliability.retries` times (on another replica when there is one; on the same worker
        only after it was unreachable or answered 5xx), then move to the next target (the policy's fallbacks).
        Every re-send spends from the registry's retry budget."""
        rel = registry.reliability
        registry.retry_budget.request()
        tries = _Tries(ex)
        for index, target in enumerate(call.targets):
            for attempt in range(rel.retries + 1):
                try:
                    # Panic mode only where no later target (a fallback) has an available worker.
                    later = any(registry.usable(t) for t in call.targets[index + 1:])
                    worker = registry.pick(target, avoid=frozenset(tries.failed), panic=not later)
                except GatewayError as err:  # nothing left for this target (its breakers opened meanwhile)
                    tries.last = tries.last or err  # a worker's own failure stays the reason
                    break
                self._before_resend(registry, tries, attempt, target, ex)
                if not worker.available() and self.metrics.enabled:
                    self.metrics.panic_sends.labels(worker.name).inc()
                delay = rel.retry_backoff_s * 2 ** (attempt - 1) * random.random() if attempt else 0.0
                try:
                    return await self._attempt(registry, worker, call, ex, delay)
                except GatewayError as err:
                    if not self._note_failure(registry, tries, err, worker, target):
                        break  # a hung or saturated worker would be so again: go to the next target
            if index < len(call.targets) - 1 and tries.last is not None:
                self._note_fallback(registry, ex, tries.last, target, call.targets[index + 1])
        assert tries.last is not None  # every path that does not return sets it
        raise tries.last

    def _before_resend(self, registry: WorkerRegistry, tries: _Tries, attempt: int, target: str,
                       ex: Exchange) -> None:
        """A send after a failure spends from the retry budget (raising the failure when it is spent)."""
        if tries.last is None:
            return
        if tries.sent and not registry.retry_budget.try_spend():
            self.metrics.retry_budget_exhausted.inc()
            raise tries.last
        if attempt and tries.last_worker is not None:
            self._note_retry(ex, tries.last, tries.last_worker, target)

    def _note_failure(self, registry: WorkerRegistry, tries: _Tries, err: GatewayError, worker: Worker,
                      target: str) -> bool:
        """Note a failed attempt at `worker` (re-raising what sends nothing on); whether to try `target` again."""
        outcome = err.outcome
        if not outcome.sends_on:
            raise err
        if outcome.reached_worker:  # the gate's refusal sent nothing
            tries.sent = True
            if self.metrics.enabled:  # counted here, once per failed exchange, whatever follows it
                self.metrics.upstream_errors.labels(worker.name, outcome).inc()
            tries.ex.failure_counted = True  # so the request's end does not count it again
        tries.last, tries.last_worker = err, worker
        tries.failed.add(worker.name)
        others = any(w.name not in tries.failed for w in registry.usable(target))
        return outcome.retries_same_model or others

    async def _attempt(self, registry: WorkerRegistry, worker: Worker, call: Call, ex: Exchange,
                       delay_s: float) -> Answer | Streaming:
        """One try at `worker`, after `delay_s` (a retry's backoff): hold a place there, send, and tell its
        breaker how it went (for a stream, whoever ends the request does, with the relay's verdict)."""
        if delay_s:
            await asyncio.sleep(delay_s)
        call.body["model"] = worker.model
        payload = encode_json(call.body)  # before the lease: a body that cannot be sent holds no place
        lease = await Lease.take(worker, registry.reliability)
        # The exchange is this worker's from here on (not while queued: a client leaving the line owes nothing).
        ex.worker, ex.model, ex.failure_counted = worker.name, worker.model, False
        headers = _upstream_headers(worker, ex.request_id)
        span = upstream_span(worker.name, worker.model, worker.config.base_url + call.path, headers, call.operation)
        try:
            if ex.stream:
                opened = await self._open_stream(worker, call.path, payload, headers, ex)
                relay = StreamRelay(opened, ex, call.wants_usage, call.shape, call.on_response_id, span)
                return Streaming(relay, lease)
            answer = await self._forward(worker, call.path, payload, headers, ex)
        except GatewayError as err:
            outcome = err.outcome
            lease.end("failed" if outcome.sends_on else "neutral" if err.status >= 500 else "ok")
            end_upstream(span, False, outcome.value, err.upstream_status)
            raise
        except BaseException:
            lease.end("neutral")  # cancelled: the client went away
            end_upstream(span, False, Outcome.CLIENT_DISCONNECT.value)
            raise
        lease.end("ok")
        end_upstream(span, True, status=answer.status)
        return answer

    async def _forward(self, worker: Worker, path: str, payload: bytes, headers: dict[str, str],
                       ex: Exchange) -> Answer:
        """Non-streaming: send, wait for the whole answer (within the worker's total timeout), account."""
        to = worker.timeouts
        t = time.perf_counter()
        try:
            async with asyncio.timeout(to.total_s):
                resp = await self.client.send("POST", worker.config.base_url + path, content=payload,
                                              headers=headers, timeouts=to.for_client())
        except TimeoutError:
            raise upstream_timeout(worker.name) from None
        except UpstreamFailure as exc:
            raise from_upstream_failure(exc.kind, worker.name) from None
        finally:
            ex.upstream_s += time.perf_counter() - t
        if not 200 <= resp.status < 300:
            raise from_upstream_status(worker.name, resp.status, resp.content)
        try:
            data = orjson.loads(resp.content)
        except orjson.JSONDecodeError:
            raise GatewayError(502, f"Worker '{worker.name}' sent a body that is not JSON.",
                               type="server_error", code=Outcome.UPSTREAM_BAD_RESPONSE.value) from None
        ex.set_usage(data.get("usage") if isinstance(data, dict) else None, worker.config.price)
        if isinstance(data, dict) and data.get("object") == "response" and isinstance(data.get("id"), str):
            ex.response_id = data["id"]  # a Responses API answer: its worker holds it
        if ex.completion_parts is not None and isinstance(data, dict):
            ex.completion_parts.extend(answer_texts(data))
        ex.http_status = resp.status
        return Answer(resp.content, resp.status)

    async def _open_stream(self, worker: Worker, path: str, payload: bytes, headers: dict[str, str],
                           ex: Exchange) -> OpenedStream:
        """Streaming: open the upstream stream and wait for its first bytes (within the TTFT timeout) before
        answering the client, so that a worker failing before its first token is retried or falls back like
        any other failure before the first byte."""
        to = worker.timeouts
        deadline = asyncio.get_running_loop().time() + to.total_s
        resp: UpstreamStream | None = None
        t = time.perf_counter()
        try:
            async with asyncio.timeout(min(to.ttft_s, to.total_s)):
                resp = await self.client.open("POST", worker.config.base_url + path, content=payload,
                                              headers=headers, timeouts=to.for_client())
                if resp.status != 200:
                    raise from_upstream_status(worker.name, resp.status, await _read_quietly(resp))
                chunks = resp.chunks()
                first = await anext(chunks, b"")
            if not first:
                raise GatewayError(502, f"Worker '{worker.name}' ended the stream before its first event.",
                                   type="server_error", code=Outcome.UPSTREAM_ERROR.value)
        except BaseException as exc:
            if resp is not None:
                with anyio.CancelScope(shield=True):
                    await resp.aclose()
            if isinstance(exc, TimeoutError):
                raise upstream_timeout(worker.name) from None
            if isinstance(exc, UpstreamFailure):
                raise from_upstream_failure(exc.kind, worker.name) from None
            raise
        finally:
            ex.upstream_s += time.perf_counter() - t
        return OpenedStream(worker, resp, chunks, first, deadline)

    def _note_retry(self, ex: Exchange, err: GatewayError, failed: Worker, target: str) -> None:
        """Record that the request goes to `target` again after `err`, the failure of worker `failed` (already
        counted in `turnout_upstream_errors` when it reached the worker)."""
        if self.metrics.enabled:
            self.metrics.retries.labels(failed.model, err.outcome).inc()
        ex.retries += 1
        log.warning("request %s: worker %s failed before its first byte (%s); retrying %s", ex.request_id,
                    failed.name, err.log_message(), target)

    def _note_fallback(self, registry: WorkerRegistry, ex: Exchange, err: GatewayError, failed: str,
                       to: str) -> None:
        """Record that target `failed` failed before its first byte (`err`: its worker's failure, or no worker
        was left to try) and the request moves on to target `to`. `ex.worker` may name an earlier target's
        worker here."""
        from_model, to_model = registry.resolve(failed)[0].model, registry.resolve(to)[0].model
        if self.metrics.enabled:
            self.metrics.fallbacks.labels(ex.policy or "", from_model, to_model, err.outcome).inc()
        ex.fallback_from.append(from_model)
        log.warning("request %s: %s failed before its first byte (%s); falling back to %s",
                    ex.request_id, from_model, err.log_message(), to_model)


async def _read_quietly(resp: UpstreamStream) -> bytes:
    """A refused stream's body, for its error message (empty when even that fails)."""
    try:
        return await resp.read()
    except UpstreamFailure:
        return b""
