"""Raw ASGI helpers shared by the stand-in workers (the demo's replay workers and the tests' fake worker)."""

from __future__ import annotations

from starlette.types import Receive


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected before sending all of it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
