"""The upstream client against real sockets: answers read whole and as a stream, and each way an exchange can
fail reported as its kind (which `server.errors.from_upstream_failure` maps to the client's status)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from server.config import UpstreamConfig
from server.upstream.client import UpstreamClient, UpstreamFailure, UpstreamTimeouts
from testkit.procs import free_port

TIMEOUTS = UpstreamTimeouts(connect=2.0, read=2.0, pool=2.0)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """A one-off HTTP server on a free port; yields its base URL. Every connection is closed on the way out."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _read_head(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                   if line.startswith(b"content-length:")), 0)
    await reader.readexactly(length)


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            await _read_head(reader)
        except asyncio.IncompleteReadError:
            break
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 8\r\n\r\n{\"a\": 1}")
        await writer.drain()


async def stream_then_break(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"b\r\ndata: one\n\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()  # mid-body: the chunked body never ends


async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _read_head(reader)
    await reader.read()  # until the client gives up and closes


async def test_whole_answer_and_connection_reuse() -> None:
    client = UpstreamClient(UpstreamConfig())
    try:
        async with serving(answer_ok) as url:
            for _ in range(3):
                answer = await client.send("POST", url + "/v1/x", content=b"{}", timeouts=TIMEOUTS)
                assert (answer.status, answer.content) == (200, b'{"a": 1}')
    finally:
        await client.aclose()


async def test_a_stream_broken_mid_body_is_broken() -> None:
    client = UpstreamClient(UpstreamConfig())
    try:
        async with serving(stream_then_break) as url:
            stream = await client.open("POST", url + "/v1/x", content=b"{}", timeouts=TIMEOUTS)
            chunks = stream.chunks()
            assert await anext(chunks) == b"data: one\n\n"
            with pytest.raises(UpstreamFailure) as info:
                await anext(chunks)
            assert info.value.kind == "broken"
            await stream.aclose()
            await stream.aclose()  # twice is harmless
    finally:
        await client.aclose()


async def test_refused_connection_is_unreachable() -> None:
    client = UpstreamClient(UpstreamConfig())
    try:
        with pytest.raises(UpstreamFailure) as info:
            await client.send("POST", f"http://127.0.0.1:{free_port()}/v1/x", content=b"{}", timeouts=TIMEOUTS)
        assert info.value.kind == "unreachable"
    finally:
        await client.aclose()


async def test_silence_past_the_read_backstop_is_a_timeout() -> None:
    client = UpstreamClient(UpstreamConfig())
    try:
        async with serving(never_answer) as url:
            with pytest.raises(UpstreamFailure) as info:
                await client.send("POST", url + "/v1/x", content=b"{}",
                                  timeouts=UpstreamTimeouts(connect=2.0, read=0.2, pool=2.0))
            assert info.value.kind == "timeout"
    finally:
        await client.aclose()


async def test_a_full_pool_is_busy_and_a_slot_comes_back_when_a_stream_closes() -> None:
    client = UpstreamClient(UpstreamConfig(max_connections=1))
    try:
        async with serving(answer_ok) as url:
            held = await client.open("POST", url + "/v1/x", content=b"{}", timeouts=TIMEOUTS)
            with pytest.raises(UpstreamFailure) as info:
                await client.send("POST", url + "/v1/x", content=b"{}",
                                  timeouts=UpstreamTimeouts(connect=2.0, read=2.0, pool=0.1))
            assert info.value.kind == "busy"
            await held.aclose()
            answer = await client.send("POST", url + "/v1/x", content=b"{}", timeouts=TIMEOUTS)
            assert answer.status == 200
    finally:
        await client.aclose()


async def test_a_failed_send_gives_its_slot_back() -> None:
    client = UpstreamClient(UpstreamConfig(max_connections=1))
    try:
        for _ in range(3):
            with pytest.raises(UpstreamFailure):
                await client.send("POST", f"http://127.0.0.1:{free_port()}/v1/x", content=b"{}",
                                  timeouts=UpstreamTimeouts(connect=2.0, read=2.0, pool=0.2))
    finally:
        await client.aclose()


async def test_a_read_cancelled_mid_stream_gives_its_slot_back_on_close() -> None:
    async def stream_slowly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"b\r\ndata: one\n\n\r\n")
        await writer.drain()
        await reader.read()  # nothing more until the client goes away

    client = UpstreamClient(UpstreamConfig(max_connections=1))
    try:
        async with serving(stream_slowly) as url:
            stream = await client.open("POST", url + "/v1/x", content=b"{}", timeouts=TIMEOUTS)
            chunks = stream.chunks()
            assert await anext(chunks) == b"data: one\n\n"
            async def next_chunk() -> bytes:
                return await anext(chunks)

            reading = asyncio.create_task(next_chunk())
            await asyncio.sleep(0.05)
            reading.cancel()  # the client left while the worker was still generating
            await asyncio.gather(reading, return_exceptions=True)
            await stream.aclose()
        async with serving(answer_ok) as url:
            answer = await client.send("POST", url + "/v1/x", content=b"{}",
                                       timeouts=UpstreamTimeouts(connect=2.0, read=2.0, pool=0.5))
            assert answer.status == 200, "the one slot came back"
    finally:
        await client.aclose()
