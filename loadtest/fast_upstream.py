"""A light fake OpenAI-compatible worker for benchmarks at hundreds of requests or tens of thousands of stream
chunks a second, where the test suite's fake worker (`testkit.fakes.worker`, FastAPI) would be the limit.

It answers `POST /v1/chat/completions` (any model name): after `--latency-ms` a whole answer of exactly
`max_tokens` tokens, or, with `"stream": true`, a first chunk after `--ttft-ms` and then one chunk per token
every `--itl-ms`, the final chunk, a usage chunk when `stream_options.include_usage` asks for it, and
`[DONE]`. Also `GET /health` and `GET /v1/models`; anything else is a 404. Usage counts a prompt token per four
characters of the request body, like the suite's fake.

Built on the event loop's protocols and httptools' HTTP parser (what uvicorn uses) under uvloop: one process
serves several thousand answers or tens of thousands of chunks a second on one core.

    python -m loadtest.fast_upstream --port 8001 [--latency-ms 50] [--ttft-ms 50 --itl-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any, cast

import httptools
import orjson
import uvloop

_OK = b"HTTP/1.1 200 OK\r\n"


def _head(status: bytes, content_type: bytes, length: int | None) -> bytes:
    size = b"content-length: %d\r\n" % length if length is not None else b"transfer-encoding: chunked\r\n"
    return status + b"content-type: " + content_type + b"\r\n" + size + b"\r\n"


def _chunk(data: bytes) -> bytes:
    """One piece of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Answers:
    """How the fake answers: its delays in seconds."""

    def __init__(self, latency_s: float, ttft_s: float, itl_s: float) -> None:
        self.latency_s, self.ttft_s, self.itl_s = latency_s, ttft_s, itl_s

    @staticmethod
    def completion(model: str, max_tokens: int, prompt_tokens: int) -> bytes:
        """A whole chat completion of `max_tokens` one-word tokens."""
        return orjson.dumps({
            "id": "chatcmpl-fast", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok " * max_tokens},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                      "total_tokens": prompt_tokens + max_tokens}})


class _Stream:
    """One streamed answer, written chunk by chunk on timers (no task per stream)."""

    def __init__(self, proto: _Protocol, model: str, max_tokens: int, prompt_tokens: int, usage: bool) -> None:
        self.proto, self.max_tokens, self.prompt_tokens, self.usage = proto, max_tokens, prompt_tokens, usage
        self.sent = 0
        self.prefix = b'data: {"id":"chatcmpl-fast","object":"chat.completion.chunk","created":%d,"model":%s,' % (
            int(time.time()), orjson.dumps(model))

    def start(self, loop: asyncio.AbstractEventLoop, ttft_s: float, itl_s: float) -> None:
        self.loop, self.itl_s = loop, itl_s
        self.proto.write(_head(_OK, b"text/event-stream", None))
        loop.call_later(ttft_s, self.step)

    def step(self) -> None:
        if self.proto.closed:
            return
        if self.sent < self.max_tokens:
            role = b'"role":"assistant",' if self.sent == 0 else b""
            self.proto.write(_chunk(self.prefix + b'"choices":[{"index":0,"delta":{' + role
                                    + b'"content":"tok "},"finish_reason":null}]}\n\n'))
            self.sent += 1
            self.loop.call_later(self.itl_s, self.step)
            return
        out = self.prefix + b'"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
        if self.usage:
            out += self.prefix + b'"choices":[],"usage":' + orjson.dumps(
                {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.max_tokens,
                 "total_tokens": self.prompt_tokens + self.max_tokens}) + b"}\n\n"
        out += b"data: [DONE]\n\n"
        self.proto.write(_chunk(out) + b"0\r\n\r\n")
        self.proto.answered()


class _Protocol(asyncio.Protocol):
    """One client connection: requests one at a time (keep-alive), each answered on its own timers."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.url = b""
        self.body = bytearray()
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.write(_head(b"HTTP/1.1 400 Bad Request\r\n", b"text/plain", 0))
            self.close()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def answered(self) -> None:
        """The current answer is complete."""
        if not self.keep_alive:
            self.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.body = b"", bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        method, path = self.parser.get_method(), self.url.split(b"?", 1)[0]
        if method == b"GET" and path == b"/health":
            self.write(_head(_OK, b"text/plain", 2) + b"ok")
            self.answered()
        elif method == b"GET" and path == b"/v1/models":
            body = b'{"object":"list","data":[{"id":"fake-model","object":"model","owned_by":"fast"}]}'
            self.write(_head(_OK, b"application/json", len(body)) + body)
            self.answered()
        elif method == b"POST" and path == b"/v1/chat/completions":
            self.chat()
        else:
            self.write(_head(b"HTTP/1.1 404 Not Found\r\n", b"text/plain", 9) + b"not found")
            self.answered()

    def chat(self) -> None:
        try:
            req: Any = orjson.loads(bytes(self.body))
            model, max_tokens = str(req.get("model", "fake-model")), int(req.get("max_tokens") or 16)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            body = b'{"error":{"message":"bad request body","type":"invalid_request_error"}}'
            self.write(_head(b"HTTP/1.1 400 Bad Request\r\n", b"application/json", len(body)) + body)
            self.answered()
            return
        prompt_tokens = max(1, len(self.body) // 4)
        loop = asyncio.get_running_loop()
        a = self.answers
        if req.get("stream"):
            usage = bool((req.get("stream_options") or {}).get("include_usage"))
            _Stream(self, model, max_tokens, prompt_tokens, usage).start(loop, a.ttft_s, a.itl_s)
            return
        body = a.completion(model, max_tokens, prompt_tokens)

        def send() -> None:
            self.write(_head(_OK, b"application/json", len(body)) + body)
            self.answered()

        loop.call_later(a.latency_s, send)


async def serve(host: str, port: int, answers: Answers) -> None:
    """Serve until cancelled."""
    server = await asyncio.get_running_loop().create_server(lambda: _Protocol(answers), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Parse the flags and serve."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency-ms", type=float, default=50.0, help="delay of a whole answer")
    ap.add_argument("--ttft-ms", type=float, default=50.0, help="delay of a stream's first chunk")
    ap.add_argument("--itl-ms", type=float, default=20.0, help="delay between a stream's chunks")
    args = ap.parse_args()
    uvloop.run(serve(args.host, args.port, Answers(args.latency_ms / 1000, args.ttft_ms / 1000,
                                                    args.itl_ms / 1000)))


if __name__ == "__main__":
    main()
