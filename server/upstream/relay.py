"""`StreamRelay`: a worker's SSE stream relayed event by event, its usage taken, and every stream ended properly.

A stream the worker breaks off, falls silent in (`idle_timeout_s`) or runs past its total time ends with an
error event and `[DONE]`, never a silent truncation. The relay owns the worker's open response; the worker's
lease is the request lifecycle's (`server.api.lifecycle`), which ends it with the relay's `verdict`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import orjson

from server.errors import GatewayError, upstream_stream_error
from server.outcome import Outcome
from server.telemetry.record import Exchange
from server.upstream.sse import DONE, EventSplitter, event_data
from server.upstream.workers import Verdict, Worker


@dataclass(slots=True)
class OpenedStream:
    """A worker's stream whose first bytes have arrived: the response, its byte iterator, the first chunk, and
    the loop time by which the whole stream must end (the worker's total timeout)."""

    worker: Worker
    response: httpx.Response
    chunks: AsyncIterator[bytes]
    first: bytes
    deadline: float


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


class StreamRelay:
    """Relays one opened stream to the client (iterate it once), noting usage, time to first token and errors
    on the request's `Exchange`. `verdict` is what the worker's breaker should hear once it has ended."""

    def __init__(self, opened: OpenedStream, ex: Exchange, wants_usage: bool) -> None:
        """`wants_usage`: the client asked for the usage-only chunk (the gateway always asks the worker)."""
        self._up, self._worker, self._ex = opened, opened.worker, ex
        self._wants_usage = wants_usage
        self._closed = False
        self._completed = False
        self.verdict: Verdict = "neutral"

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
            what = (f"no event for {to.idle_s:g} s (idle timeout)" if to.idle_s <= total_left
                    else f"the stream ran past {to.total_s:g} s (total timeout)")
            raise upstream_stream_error(self._worker.name, what) from None

    def _relay(self, chunk: bytes, splitter: EventSplitter) -> tuple[bytes, bool]:
        """The events of `chunk` to send on, and whether `[DONE]` was among them."""
        out = bytearray()
        saw_done = False
        for event in splitter.feed(chunk):
            data = event_data(event)
            if data is None:
                continue
            if data == DONE:
                saw_done = True
            elif not self._keep(data):
                continue
            elif self._ex.completion_parts is not None:
                self._ex.completion_parts.extend(_chunk_texts(data))
            out += event + b"\n\n"
        return bytes(out), saw_done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        ex = self._ex
        splitter = EventSplitter()
        saw_done = False
        try:
            chunk, self._up.first = self._up.first, b""
            while chunk:
                t = time.perf_counter()
                out, done = self._relay(chunk, splitter)
                saw_done = saw_done or done
                ex.relay_s += time.perf_counter() - t  # the gateway's own work on this chunk
                if out:
                    if ex.ttft_s is None:
                        ex.ttft_s = time.perf_counter() - ex.started
                    yield out
                chunk = await self._next()
            if not saw_done:
                raise upstream_stream_error(self._worker.name, "the stream ended without [DONE]")
            self.verdict = "ok"
        except (httpx.HTTPError, GatewayError) as exc:
            err = exc if isinstance(exc, GatewayError) else upstream_stream_error(
                self._worker.name, type(exc).__name__)
            ex.status, ex.error = Outcome.STREAM_ERROR, err.log_message()
            self.verdict = "failed"
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
            self._ex.status, self._ex.error = Outcome.STREAM_ERROR, "the worker sent an error event"
            return True
        usage = obj.get("usage")
        if usage:
            self._ex.set_usage(usage, self._worker.config.price)
            if not obj.get("choices"):
                return self._wants_usage
        return True

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
