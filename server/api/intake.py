"""A relayed API's request body, from bytes to a validated request: decoded, its lists counted, validated against
its schema, its limits checked (`server.api.input_limits`).

A large body is taken in off the event loop, in a worker thread: decoding and validating megabytes takes tens of
milliseconds, during which the loop would serve no other request or stream (`/healthz` stalled for most of a second
on a body of 140,000 parts, before parts were bounded). The thread still shares the interpreter, but the loop
gets its turn every few milliseconds instead of waiting for the whole. A small body is taken in on the loop:
handing it to a thread would cost more than the work.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.api.body import decode_json
from server.api.input_limits import check_counts, check_limits
from server.api.protocol import OpenAIRequest, validate_body
from server.config import ServerConfig

#: Bodies up to this size are decoded and validated on the event loop (well under a millisecond).
INLINE_BYTES = 64 * 1024


def take_in(raw: bytes, schema: type[OpenAIRequest], srv: ServerConfig) -> tuple[dict[str, Any], OpenAIRequest]:
    """The decoded body and its validated request; a 400 naming the first problem otherwise."""
    body = decode_json(raw)
    check_counts(body, srv)
    req = validate_body(schema, body)
    check_limits(body, srv)
    return body, req


async def take_in_async(raw: bytes, schema: type[OpenAIRequest],
                        srv: ServerConfig) -> tuple[dict[str, Any], OpenAIRequest]:
    """`take_in`, in a worker thread when `raw` is larger than `INLINE_BYTES`."""
    if len(raw) <= INLINE_BYTES:
        return take_in(raw, schema, srv)
    return await asyncio.to_thread(take_in, raw, schema, srv)
