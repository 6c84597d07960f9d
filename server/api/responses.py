"""The two responses a request ends with, each of which ends the request's lifecycle exactly when its last
bytes are about to go out: so a client holding the whole answer also finds it counted in `/metrics`.

`RelayResponse` streams: it must (1) pass each event on as soon as it is complete, and (2) close the upstream
request the moment the client goes away, so the worker stops generating. Starlette's `StreamingResponse` only
notices a disconnect when a write fails (ASGI spec >= 2.4) and leaves closing the iterator to the garbage
collector, so `RelayResponse` does both explicitly.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import Any

import anyio
import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

End = Callable[[], Awaitable[None]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`data` as a JSON response."""
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=headers)


class EndingResponse(Response):
    """A whole response that runs `end` before its body goes out (and in any case once it is done)."""

    def __init__(self, content: bytes, status_code: int, headers: Mapping[str, str], end: End,
                 media_type: str | None = "application/json") -> None:
        super().__init__(content, status_code=status_code, headers=headers, media_type=media_type)
        self._end = end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_after_end(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with anyio.CancelScope(shield=True):
                    await self._end()
            await send(message)

        try:
            await super().__call__(scope, receive, send_after_end)
        finally:
            with anyio.CancelScope(shield=True):
                await self._end()


#: After the worker's stream had to end (its total timeout), a client still this far behind in reading it is cut off.
READ_GRACE_S = 10.0


class RelayResponse(Response):
    """Streams `chunks`, stops on client disconnect, and always runs `end` (which closes the upstream).

    A client that stops reading blocks every write (the socket's buffer is full), and with it the relay's reads from
    the worker, whose own timeouts are measured between those reads: so the response as a whole must be over
    `READ_GRACE_S` after `deadline` (the worker stream's total timeout, loop time), or it is cut off and
    `on_cut(why)` told; the worker's request is closed with it."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterable[bytes], end: End, headers: Mapping[str, str] | None = None,
                 deadline: float | None = None, on_cut: Callable[[str], None] | None = None) -> None:
        self.chunks, self._end = chunks, end
        self._deadline, self._on_cut = deadline, on_cut
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = math.inf if self._deadline is None else self._deadline + READ_GRACE_S
        try:
            with anyio.CancelScope(deadline=deadline) as limit:
                await self._relay(receive, send)
            if limit.cancelled_caught and self._on_cut is not None:
                self._on_cut(f"the client did not read its stream: cut off {READ_GRACE_S:g} s after the total "
                             "timeout")
        finally:
            with anyio.CancelScope(shield=True):
                await self._end()

    async def _relay(self, receive: Receive, send: Send) -> None:
        """Send the chunks until they end or the client leaves."""
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                try:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                    async for chunk in self.chunks:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    # The stream is spent: ending the request now records it before the response ends.
                    with anyio.CancelScope(shield=True):
                        await self._end()
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:
                    pass  # the client went away while we wrote (servers that raise on send)
                tg.cancel_scope.cancel()

            async def watch() -> None:
                await _wait_disconnect(receive)
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            tg.start_soon(watch)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
