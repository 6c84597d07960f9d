"""Reading a request: its body within a size limit, its JSON, and waiting on work unless the client leaves."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import orjson
from fastapi import Request

from server.errors import bad_request, payload_too_large

T = TypeVar("T")


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


async def read_json_bytes(request: Request, limit: int) -> bytes:
    """The request's body, declared as `application/json` (as vLLM requires: a form or plain text is a 400 here
    too, never guessed at) and at most `limit` bytes (413); not yet decoded."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise bad_request(f"Unsupported media type '{media or 'none'}': send the body as application/json.")
    return await read_body(request, limit)


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body (see `read_json_bytes`), decoded: valid JSON or a 400. For small bodies; the
    relayed APIs' bodies go through `server.api.intake`, which decodes large ones off the event loop."""
    return decode_json(await read_json_bytes(request, limit))


def decode_json(raw: bytes) -> Any:
    """Parse a JSON body; 400 with the parser's reason when it is not JSON."""
    if not raw.strip():
        raise bad_request("Request body is empty; expected a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:  # orjson says "surrogates not allowed" at character 0 for any invalid UTF-8: say where it is
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise bad_request(f"Request body is not valid JSON: it is not valid UTF-8 (byte "
                              f"0x{raw[bad.start]:02x} at offset {bad.start}).") from None
        raise bad_request(f"Request body is not valid JSON: {exc}") from None


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
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
