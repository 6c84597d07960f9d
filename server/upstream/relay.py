"""`StreamRelay`: a worker's SSE stream relayed event by event, its usage taken, and every stream ended properly.

A stream the worker breaks off, falls silent in (`idle_timeout_s`) or runs past its total time ends with the
API's own error event (`server.upstream.shapes`), never a silent truncation. The relay owns the worker's open
response; the worker's lease is the request lifecycle's (`server.api.lifecycle`), which ends it with the relay's
`verdict`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from opentelemetry.trace import Span

from server.errors import GatewayError, upstream_stream_error
from server.outcome import Outcome
from server.telemetry.record import Exchange
from server.telemetry.tracing import end_upstream
from server.upstream.client import UpstreamFailure, UpstreamStream
from server.upstream.shapes import CHAT, Seen, StreamShape, with_fingerprint
from server.upstream.sse import EventSplitter, event_data
from server.upstream.workers import Verdict, Worker

#: Called with a Responses stream's id before the event naming it goes out (so a follow-up finds its worker),
#: and again before its final event goes out, with the usage then on the exchange.
OnResponseId = Callable[[str], Awaitable[None]]


@dataclass(slots=True)
class OpenedStream:
    """A worker's stream whose first bytes have arrived: the response, its byte iterator, the first chunk, and
    the loop time by which the whole stream must end (the worker's total timeout)."""

    worker: Worker
    response: UpstreamStream
    chunks: AsyncIterator[bytes]
    first: bytes
    deadline: float


class StreamRelay:
    """Relays one opened stream to the client (iterate it once), noting usage, time to first token and errors
    on the request's `Exchange`. `verdict` is what the worker's breaker should hear once it has ended."""

    def __init__(self, opened: OpenedStream, ex: Exchange, wants_usage: bool, shape: StreamShape = CHAT,
                 on_response_id: OnResponseId | None = None, span: Span | None = None) -> None:
        """`wants_usage`: the client asked for OpenAI's usage-only chunk (the gateway always asks the worker);
        `shape`: the API whose stream this is; `on_response_id`: told a Responses stream's id; `span`: the trace
        span of the call to the worker, ended with the stream."""
        self._span = span
        self._up, self._worker, self._ex = opened, opened.worker, ex
        self._wants_usage = wants_usage
        self._shape = shape
        self._on_response_id = on_response_id
        self._partial_usage: dict[str, Any] = {}
        self._held: bytes | None = None  # a choice's final chunk, held for the fingerprint (see `_relay`)
        self._last_data = b""
        self._closed = False
        self._completed = False
        self._request_too_long = False  # it ran past the total timeout: the request's length, not the worker
        self.verdict: Verdict = "neutral"

    @property
    def deadline(self) -> float:
        """The loop time by which the worker's stream must have ended (its total timeout)."""
        return self._up.deadline

    def cut_off(self, why: str) -> None:
        """The client stopped reading: the request ends here (the lifecycle closes the worker's stream)."""
        if not self._completed:
            self._ex.status, self._ex.error = Outcome.CLIENT_DISCONNECT, why

    async def _next(self) -> bytes:
        """The next raw chunk (b"" at the end), within the idle timeout and the total deadline. The timeout
        is only ever around this read, never across a `yield`: a timeout firing while the consumer sends
        would cancel the consumer instead."""
        loop = asyncio.get_running_loop()
        to = self._worker.timeouts
        total_left = self._up.deadline - loop.time()
        wait = min(to.idle_s, total_left)
        try:
            async with asyncio.timeout(max(0.0, wait)):
                return await anext(self._up.chunks, b"")
        except TimeoutError:
            if to.idle_s <= total_left:
                raise upstream_stream_error(self._worker.name, f"no event for {to.idle_s:g} s (idle timeout)") \
                    from None
            # A long answer, not a failing worker: the worker's breaker must not hear of it (a few long streams
            # would otherwise cut the worker off for every tenant).
            self._request_too_long = True
            raise upstream_stream_error(self._worker.name, f"the stream ran past {to.total_s:g} s (total "
                                                           "timeout)") from None

    def _relay(self, chunk: bytes, splitter: EventSplitter) -> tuple[bytes, bool, str | None]:
        """The events of `chunk` to send on, whether the stream's final event was among them, and a Responses
        stream's id when one of them named it."""
        out = bytearray()
        ended = False
        response_id = None
        want_text = self._ex.completion_parts is not None
        for event in splitter.feed(chunk):
            data = event_data(event)
            if data is None:
                continue
            seen = self._shape.read(data, want_text)
            ended = ended or seen.end
            response_id = response_id or seen.response_id
            if not self._take(seen):
                if seen.fingerprint is not None and self._held is not None:  # the dropped usage chunk's
                    self._held = with_fingerprint(self._held, seen.fingerprint)
                continue
            if seen.texts and self._ex.completion_parts is not None:
                self._ex.completion_parts.extend(seen.texts)
            self._last_data = data
            out += self._release()
            if seen.finish and not self._wants_usage:
                # Held until the next event: the usage chunk that follows it (asked for by the gateway, not the
                # client, so dropped) carries the fingerprint the client would have had on this one.
                self._held = event
                continue
            out += event + b"\n\n"
        return bytes(out), ended, response_id

    def _release(self) -> bytes:
        """The held final chunk, if any, to go out now."""
        held, self._held = self._held, None
        return held + b"\n\n" if held is not None else b""

    def _take(self, seen: Seen) -> bool:
        """Note what an event told (usage, the worker's own failure); whether to send it on (OpenAI's usage-only
        chunk goes only to a client that asked for it)."""
        ex = self._ex
        if seen.failed:
            # The worker's own error event; its message may quote the request, so it is not logged.
            ex.status, ex.error = Outcome.STREAM_ERROR, "the worker sent an error event"
        if seen.usage is not None:
            merged = {**self._partial_usage, **seen.usage}
            if seen.usage_final:
                ex.set_usage(merged, self._worker.config.price)
            else:
                self._partial_usage = merged
            if seen.usage_only:
                return self._wants_usage
        return True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        ex = self._ex
        splitter = EventSplitter()
        saw_end = False
        try:
            chunk, self._up.first = self._up.first, b""
            while chunk:
                t = time.perf_counter()
                out, ended, response_id = self._relay(chunk, splitter)
                saw_end = saw_end or ended
                ex.relay_s += time.perf_counter() - t  # the gateway's own work on this chunk
                if response_id is not None:
                    ex.response_id = response_id
                if self._on_response_id is not None and ex.response_id is not None and (response_id or ended):
                    # Told before the events go out, so a client's follow-up finds the worker (and, once the
                    # stream ended, the conversation's tokens so far).
                    await self._on_response_id(ex.response_id)
                if out:
                    if ex.ttft_s is None:
                        ex.ttft_s = time.perf_counter() - ex.started
                    yield out
                chunk = await self._next()
            if not saw_end:
                raise upstream_stream_error(self._worker.name, f"the stream ended without {self._shape.last_event}")
            self.verdict = "ok"
        except (UpstreamFailure, GatewayError) as exc:
            err = exc if isinstance(exc, GatewayError) else upstream_stream_error(
                self._worker.name, exc.detail)
            ex.status, ex.error = Outcome.STREAM_ERROR, err.log_message()
            self.verdict = "neutral" if self._request_too_long else "failed"
            yield self._release() + self._shape.failure(err, self._last_data)
        self._completed = True

    async def aclose(self) -> None:
        """Close the worker's response (which aborts its request if it is still running); a stream that did
        not complete is the client's leaving. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        try:
            with anyio.CancelScope(shield=True):
                await self._up.response.aclose()
        finally:
            if not self._completed and self._ex.status is Outcome.OK:
                self._ex.status = Outcome.CLIENT_DISCONNECT
            end_upstream(self._span, self.verdict == "ok", None if self.verdict == "ok" else self._ex.status.value,
                         self._up.response.status)
