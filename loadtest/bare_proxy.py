"""The floor a Python gateway stands on: a bare proxy on the gateway's own stack (uvicorn with httptools and
uvloop, Starlette, the aiohttp client) that forwards `POST /v1/chat/completions` to one upstream and relays the
answer's bytes, streamed or not. No validation, routing, limits, accounting, metrics or logs: the side-by-side
benchmark's measure of what Turnout's own work costs above the stack.

    python -m loadtest.bare_proxy --port 8090 --upstream http://127.0.0.1:8001/v1
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def make_app(upstream: str) -> Starlette:
    """The proxy in front of `upstream` (a base URL ending in /v1)."""
    session: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0))
        yield
        await session["s"].close()
        await asyncio.sleep(0)  # let the closed connections' sockets close before the loop ends

    async def chat(request: Request) -> Response:
        body = await request.body()
        resp = await session["s"].post(upstream + "/chat/completions", data=body,
                                       headers={"content-type": "application/json"})
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.content.iter_any():
                        yield chunk
                finally:
                    resp.release()

            return StreamingResponse(relay(), status_code=resp.status, media_type="text/event-stream")
        content = await resp.read()
        resp.release()
        return Response(content, status_code=resp.status, media_type="application/json")

    async def health(request: Request) -> Response:
        return Response(b"ok", media_type="text/plain")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)],
                     lifespan=lifespan)


def main() -> None:
    """Serve the proxy."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="the upstream's base URL, ending in /v1")
    args = ap.parse_args()
    uvicorn.run(make_app(args.upstream.rstrip("/")), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False, http="httptools", loop="uvloop", ws="none")


if __name__ == "__main__":
    main()
