"""The one pooled HTTP client to every worker, and the failures it reports.

Why aiohttp here when the rest of the project calls HTTP with httpx: on the relay path the upstream client was
the largest share of the gateway's CPU (40% of it at 100 requests/s, `loadtest/results/profile.md`). In one run
on this machine's 2 cores, a client posting 3,000 chat requests to the same local server spent 1.0-2.1 ms of
CPU per request with httpx 0.28 and 0.11-0.18 ms with aiohttp 3.14 (8 and 64 in flight). httpx stays for the
gateway's background calls (health and load polling), where its cost does not matter.

The rest of the gateway sees only this module's names: `UpstreamClient`, its `Answer` and `UpstreamStream`,
and `UpstreamFailure`, whose `kind` says what went wrong (`server.errors.from_upstream_failure` maps it to the
client's error).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Literal

import aiohttp

from server.config import UpstreamConfig

__all__ = ["UpstreamAnswer", "UpstreamClient", "UpstreamFailure", "UpstreamStream", "UpstreamTimeouts"]

FailureKind = Literal["busy", "unreachable", "timeout", "broken"]


class UpstreamFailure(Exception):
    """A failed exchange with a worker. `kind`: "busy" (no free connection within the pool timeout: the gateway
    is saturated, not the worker), "unreachable" (no connection could be made), "timeout" (the worker was
    connected but sent nothing within the read backstop), "broken" (the connection failed or the worker broke
    HTTP mid-exchange)."""

    def __init__(self, kind: FailureKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    """One request's client-level timeouts, in seconds: `pool` to get a connection slot, `connect` to open a
    connection, `read` between two reads (a backstop: callers bound time to first byte, idle gaps and the total
    more tightly)."""

    connect: float
    read: float
    pool: float


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """A whole answer: status and body."""

    status: int
    content: bytes


def _failure(exc: BaseException) -> UpstreamFailure:
    """The kind of an aiohttp (or socket) error."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return UpstreamFailure("unreachable", type(exc).__name__)
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return UpstreamFailure("timeout", type(exc).__name__)
    return UpstreamFailure("broken", type(exc).__name__)


class UpstreamStream:
    """An answer whose head has arrived and whose body is read as it comes (`chunks`). Close it (`aclose`): a
    body read to its end gives its connection back to the pool, any other closes the connection, which aborts
    the worker's request."""

    def __init__(self, response: aiohttp.ClientResponse, slot: asyncio.Semaphore) -> None:
        self._response, self._slot = response, slot
        self._done = False  # the body was read to its end
        self._closed = False

    @property
    def status(self) -> int:
        """The worker's HTTP status."""
        return self._response.status

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (`UpstreamFailure` when the connection breaks)."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            raise _failure(exc) from None
        self._done = True

    async def read(self) -> bytes:
        """The rest of the body (`UpstreamFailure` when the connection breaks)."""
        try:
            body = await self._response.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise _failure(exc) from None
        self._done = True
        return body

    def close(self) -> None:
        """End the exchange now (safe to call more than once): see the class docstring."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._done:
                self._response.release()
            else:
                self._response.close()
        finally:
            self._slot.release()

    async def aclose(self) -> None:
        """`close`, for callers that close asynchronously."""
        self.close()


class UpstreamClient:
    """Pooled connections to every worker (at most `max_connections` exchanges at once, idle connections kept
    `keepalive_expiry_s`). Proxies from the environment are ignored: the gateway talks to its own workers."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self._cfg = cfg
        # The pool's bound is this semaphore, not the connector's limit, so that waiting for a free slot (the
        # gateway saturated: 503) is told apart from a slow connect (the worker unreachable: 502).
        self._slots = asyncio.Semaphore(cfg.max_connections)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Made on first use, inside the event loop that serves the requests.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=self._cfg.keepalive_expiry_s,
                                             enable_cleanup_closed=False)
            # No cookie jar: a worker's Set-Cookie must not ride along on other tenants' requests.
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                                  cookie_jar=aiohttp.DummyCookieJar(),
                                                  timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def _take_slot(self, pool_s: float) -> None:
        try:
            async with asyncio.timeout(pool_s):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamFailure("busy", f"no free connection within {pool_s:g} s") from None

    async def open(self, method: str, url: str, *, timeouts: UpstreamTimeouts, content: bytes | None = None,
                   headers: Mapping[str, str] | None = None,
                   params: Mapping[str, str] | None = None) -> UpstreamStream:
        """Send a request and return once the answer's head has arrived; the caller reads and closes it."""
        await self._take_slot(timeouts.pool)
        try:
            response = await self._get_session().request(
                method, url, data=content, headers=headers, params=params, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect, sock_read=timeouts.read))
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, aiohttp.ClientError | OSError):
                raise _failure(exc) from None
            raise
        return UpstreamStream(response, self._slots)

    async def send(self, method: str, url: str, *, timeouts: UpstreamTimeouts, content: bytes | None = None,
                   headers: Mapping[str, str] | None = None,
                   params: Mapping[str, str] | None = None) -> UpstreamAnswer:
        """Send a request and read its whole answer."""
        stream = await self.open(method, url, timeouts=timeouts, content=content, headers=headers, params=params)
        try:
            body = await stream.read()
        finally:
            stream.close()
        return UpstreamAnswer(stream.status, body)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        session, self._session = self._session, None  # a request arriving meanwhile opens a new session
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()
            # The connections' sockets are closed by callbacks the close scheduled: let them run before the loop
            # can end (else a closed loop leaves sockets open until garbage collection; aiohttp's advice).
            await asyncio.sleep(0)
