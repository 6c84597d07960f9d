"""Client connections: the limits an HTTP server facing the internet needs and uvicorn does not have.

uvicorn (0.54, httptools) reads a request head of any size, waits for it and for its body forever, and accepts
connections until the process runs out of file descriptors: a few hundred silent or trickling clients held the
gateway's sockets for minutes, a 20 MB header was read whole, and `/healthz` was refused once descriptors ran out.
`guarded_protocol` is uvicorn's httptools protocol with those limits added, passed as `uvicorn.run(http=...)`:

- `header_timeout_s`: a request's head (request line and headers) must arrive within this time, counted from
  the connection (first request) or from the first byte of the next request (keep-alive; the idle time between
  requests stays uvicorn's `timeout_keep_alive`). Then 408, or a plain close when nothing at all was sent.
- `body_idle_timeout_s`, `body_timeout_s`: the body may pause this long between bytes, and take this long in all.
  Then 408 (the app sees the client leave).
- `max_header_bytes`: a longer head is answered 431 and closed; its bytes are counted before the parser stores
  them, so memory stays bounded.
- `max_connections`: a connection past this many open ones is answered 503 and closed at once, so its descriptor
  is free again; the rest are served.

Time the gateway itself causes is never charged to the client: reading paused because the app has not yet taken
the body it has, a `100 Continue` not yet sent, or a pipelined request waiting behind a running response.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.config import ServerConfig

log = logging.getLogger("turnout.connections")

#: The open-file limit the gateway raises its soft limit to (within the hard one) at start.
NOFILE_TARGET = 65_536

_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")


def _closing_answer(status: str) -> bytes:
    return f"HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode("ascii")


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the module's limits (class attributes, set by `guarded_protocol`)."""

    header_timeout_s = 10.0
    body_idle_timeout_s = 30.0
    body_timeout_s = 60.0
    max_header_bytes = 64 * 1024
    max_connections = 1024

    # Where the current request is: "head" (its head being read), "body" (its body being read), "done" (read:
    # being answered, or the connection idle between requests).
    _phase = "head"
    _timed = "head"  # the phase the running timer (if any) was set for
    _timer: asyncio.TimerHandle | None = None
    _head_bytes = 0
    _tail = b""  # the last bytes of the head so far: its end may be split across two reads
    _body_deadline = 0.0
    _waited = False  # at the timer's last expiry the gateway, not the client, was the one waiting

    # uvicorn's protocol interface

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Register the connection; past `max_connections`, answer 503 and close it."""
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_closing_answer("503 Service Unavailable"))
            transport.close()
            return
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the timer with the connection."""
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Count the head's bytes before the parser stores them, then parse."""
        if self._phase == "done":  # the first bytes of the next request on a kept-alive connection
            self._start_head()
        if self._phase == "head" and not self._count_head(data):
            self._refuse(_closing_answer("431 Request Header Fields Too Large"))
            return
        self._waited = False  # the client is sending: whatever the gateway waited for is over
        super().data_received(data)
        if not self.transport.is_closing():
            self._timer_for(progressed=True)

    def on_message_begin(self) -> None:
        """The parser started a request's head: a pipelined one, in the same read as the last one's end, starts
        its own count and time."""
        if self._phase == "done":
            self._start_head()
        self._phase = "head"
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        """The head is read: its body (if any) comes next."""
        self._phase = "body"
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The request is read."""
        self._phase = "done"
        super().on_message_complete()

    def on_response_complete(self) -> None:
        """The answer went out; a pipelined request may be under way."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._timer_for()

    # the limits

    def _count_head(self, data: bytes) -> bool:
        """Add this read's head bytes (up to the blank line ending the head); False when past the limit."""
        seen = self._tail + data
        ends = [i + len(end) for end in _HEAD_ENDS if (i := seen.find(end)) >= 0]
        self._head_bytes += (min(ends) - len(self._tail)) if ends else len(data)
        self._tail = seen[-3:]
        return self._head_bytes <= self.max_header_bytes

    def _start_head(self) -> None:
        self._phase, self._timed, self._head_bytes, self._tail = "head", "head", 0, b""
        self._start_timer(self.header_timeout_s)

    def _timer_for(self, progressed: bool = False) -> None:
        """The timer the request's phase needs: the head's (started with the head), the body's (its idle limit,
        restarted by each read, within its total), or none once the request is read."""
        if self._phase == "body":
            now = self.loop.time()
            if self._timed != "body":
                self._body_deadline = now + self.body_timeout_s
            if self._timed != "body" or progressed:
                self._start_timer(min(self.body_idle_timeout_s, self._body_deadline - now))
        elif self._phase == "done":
            self._stop_timer()
        elif self._timed != "head":  # a pipelined request's head, parsed from bytes already here
            self._start_timer(self.header_timeout_s)
        self._timed = self._phase

    def _start_timer(self, delay: float) -> None:
        self._stop_timer()
        self._timer = self.loop.call_later(max(delay, 0.0), self._expired)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _gateway_is_waiting(self) -> bool:
        """Whether the client is waiting on the gateway rather than the other way round."""
        cycle: Any = self.cycle
        if self.flow.read_paused:  # the app has not taken the body it has: reading is paused on purpose
            return True
        if cycle is None:
            return False
        if self._phase == "head":  # a pipelined request's head, behind a response still going out
            return not cycle.response_complete
        return bool(cycle.waiting_for_100_continue)

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._phase == "done":
            return
        in_body = self._phase == "body"
        if self._gateway_is_waiting() or self._waited:
            # While the gateway is the one waiting, look again later; once it no longer is, the client gets a whole
            # window from then (the `100 Continue` it waited for may have gone out a moment ago).
            self._waited = self._gateway_is_waiting()
            window = self.body_idle_timeout_s if in_body else self.header_timeout_s
            self._body_deadline = max(self._body_deadline, self.loop.time() + window)
            self._start_timer(min(self.header_timeout_s, self.body_idle_timeout_s) if self._waited else window)
            return
        cycle: Any = self.cycle
        answered = in_body and cycle is not None and cycle.response_started
        if in_body and cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's next receive() says the client left; its answer goes nowhere
            cycle.message_event.set()
        log.info("closing a connection from %s: its request %s did not arrive in time", self.client,
                 "body" if in_body else "head")
        sent_something = in_body or self._head_bytes > 0
        self._refuse(_closing_answer("408 Request Timeout") if sent_something and not answered else b"")

    def _refuse(self, answer: bytes) -> None:
        self._stop_timer()
        self._phase = self._timed = "done"
        if answer:
            self.transport.write(answer)
        self.transport.close()


def raise_open_file_limit(target: int = NOFILE_TARGET) -> int:
    """Raise the soft limit on open files towards `target` (never past the hard limit); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:  # a container may forbid it: keep what there is
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    return int(soft)


def connection_limit(srv: ServerConfig, open_files: int) -> int:
    """`server.max_connections`, or by default half the open-file limit: the other half stays for the
    connections to workers and Redis, the model and log files."""
    return srv.max_connections if srv.max_connections is not None else max(16, open_files // 2)


def guarded_protocol(srv: ServerConfig, open_files: int) -> type[GuardedProtocol]:
    """The protocol class for `uvicorn.run(http=...)` with `srv`'s limits."""
    limits = {"header_timeout_s": srv.header_timeout_s, "body_idle_timeout_s": srv.body_idle_timeout_s,
              "body_timeout_s": srv.body_timeout_s, "max_header_bytes": srv.max_header_bytes,
              "max_connections": connection_limit(srv, open_files)}
    return type("TurnoutHTTP", (GuardedProtocol,), limits)
