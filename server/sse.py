"""Server-sent events: splitting a byte stream into events, and a response that relays them.

The relay must (1) pass each event on as soon as it is complete, never buffering a whole stream,
and (2) close the upstream request the moment the client goes away, so the worker stops generating.
Starlette's `StreamingResponse` only notices a disconnect when a write fails (ASGI spec >= 2.4) and
leaves closing the iterator to the garbage collector, so `RelayResponse` does both explicitly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"[DONE]"


class EventSplitter:
    """Splits an SSE byte stream into complete events (the bytes between blank lines)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add bytes; return the events completed by them, without their trailing blank line."""
        self._buf += chunk
        if b"\r" in self._buf:  # normalise CRLF/CR line endings, which the SSE spec allows
            # A trailing CR may be the first half of a CRLF split across chunks: keep it for later.
            held = self._buf.endswith(b"\r")
            body = self._buf[:-1] if held else self._buf
            self._buf = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        if b"\n\n" not in self._buf:
            return []
        *events, self._buf = self._buf.split(b"\n\n")
        return [e for e in events if e]

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._buf


def event_data(event: bytes) -> bytes | None:
    """The payload of an event's `data:` lines joined by newlines, or None if it has none (comments)."""
    lines = [ln[5:].lstrip(b" ") if ln.startswith(b"data:") else None for ln in event.split(b"\n")]
    data = [ln for ln in lines if ln is not None]
    return b"\n".join(data) if data else None


class EventSource:
    """What `RelayResponse` streams from: an async iterator of byte chunks with an idempotent close."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release upstream resources and record the outcome; safe to call more than once."""
        raise NotImplementedError


class RelayResponse(Response):
    """Streams an `EventSource`, stops on client disconnect, and always closes the source."""

    media_type = "text/event-stream"

    def __init__(self, source: EventSource, headers: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await send({"type": "http.response.start", "status": self.status_code,
                                    "headers": self.raw_headers})
                        async for chunk in self.source:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        # The source is spent: closing it now records the exchange before the response
                        # ends, so a client holding the whole answer also finds it counted in /metrics.
                        with anyio.CancelScope(shield=True):
                            await self.source.aclose()
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except OSError:
                        pass  # the client went away while we wrote (servers that raise on send)
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await _wait_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            with anyio.CancelScope(shield=True):
                await self.source.aclose()


async def _wait_disconnect(receive: Callable[[], Awaitable[Mapping[str, object]]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
