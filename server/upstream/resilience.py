"""What keeps requests answered when workers fail: each worker's effective timeouts, its circuit breaker, its
concurrency gate (bounded waiting), and the gateway's retry budget.

- `Breaker`: closed (traffic flows) -> open after `failures` failed requests in a row (the worker leaves the
  candidate set) -> half-open after `open_s` (one probe request at a time) -> closed when a probe succeeds,
  open again when it fails. Only failures that say the worker is unwell count: unreachable, timed out, 5xx,
  a stream broken off. A client's 4xx says nothing about the worker.
- `Gate`: at most `limit` requests at a worker at once; up to `max_queue` more wait, each at most `timeout_s`,
  in arrival order. Never an unbounded queue: over it the caller gets `worker_overloaded` (503, Retry-After).
- `RetryBudget`: every re-send of a request (a retry or a fallback) spends one token; the bucket holds
  `ratio` x the requests of the last 10 s plus `min_per_s` x 10, so during an outage retries add at most that
  share to the load instead of multiplying it.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.config import ReliabilityConfig, Timeouts, UpstreamConfig, WorkerConfig
from server.errors import GatewayError
from server.upstream.client import UpstreamTimeouts


@dataclass(frozen=True, slots=True)
class EffectiveTimeouts:
    """A worker's timeouts: its own overrides, else the `upstream` defaults (see `server.config.Timeouts`)."""

    connect_s: float
    ttft_s: float
    idle_s: float
    total_s: float
    pool_s: float = 10.0

    @classmethod
    def of(cls, upstream: UpstreamConfig, worker: WorkerConfig) -> EffectiveTimeouts:
        """The timeouts that apply to requests sent to `worker`."""
        own: Timeouts = worker.timeouts
        return cls(
            connect_s=own.connect_timeout_s or upstream.connect_timeout_s,
            ttft_s=own.ttft_timeout_s or upstream.ttft_timeout_s,
            idle_s=own.idle_timeout_s or upstream.idle_timeout_s,
            total_s=own.total_timeout_s or upstream.total_timeout_s,
            pool_s=upstream.pool_timeout_s,
        )

    def for_client(self) -> UpstreamTimeouts:
        """The HTTP client's per-request timeouts. Reads are bounded more tightly by the callers (TTFT, idle,
        total); the read timeout here is the backstop."""
        return UpstreamTimeouts(connect=self.connect_s, read=self.total_s, pool=self.pool_s)


class BreakerState(enum.Enum):
    """A circuit breaker's state; the value is what `turnout_worker_breaker_state` reports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Breaker:
    """One worker's circuit breaker (see the module docstring). `on_change(old, new)` hears every transition."""

    def __init__(self, failures: int, open_s: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState, BreakerState], None] | None = None) -> None:
        self.failures_to_open, self.open_s, self.clock = failures, open_s, clock
        self.on_change = on_change
        self._state = BreakerState.CLOSED
        self.failures = 0  # failed requests in a row
        self._opened_at = 0.0
        self._probing = False  # a half-open probe is in flight

    @property
    def state(self) -> BreakerState:
        """The state now: an open breaker whose `open_s` has passed is half-open."""
        if self._state is BreakerState.OPEN and self.clock() - self._opened_at >= self.open_s:
            self._set(BreakerState.HALF_OPEN)
        return self._state

    def available(self) -> bool:
        """Whether the worker may be chosen: closed, or half-open with no probe in flight."""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN and not self._probing)

    def begin(self) -> None:
        """A request is being sent; in half-open it is the probe."""
        if self.state is BreakerState.HALF_OPEN:
            self._probing = True

    def success(self) -> None:
        """The request succeeded (or failed for a reason that is not the worker's): close."""
        self.failures, self._probing = 0, False
        if self._state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        """The request failed because of the worker: count it, and open at the threshold (at once in half-open)."""
        self.failures += 1
        self._probing = False
        if self.state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self.failures >= self.failures_to_open):
            self._opened_at = self.clock()
            self._set(BreakerState.OPEN)

    def release(self) -> None:
        """The request ended without saying anything about the worker (the client went away): a probe's turn
        passes to the next request."""
        self._probing = False

    def _set(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old is not new and self.on_change is not None:
            self.on_change(old, new)


def worker_overloaded(target: str, retry_after_s: float) -> GatewayError:
    """503: every worker for `target` is at its concurrency limit and its queue is full or too slow."""
    return GatewayError(503, f"The workers serving '{target}' are at capacity; retry shortly.",
                        type="server_error", code="worker_overloaded",
                        headers={"retry-after": str(max(1, math.ceil(retry_after_s)))})


class Gate:
    """At most `limit` requests at a worker at once, and a bounded line of waiters (see the module docstring).
    `limit` None: no limit, no waiting."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Requests in line."""
        return len(self._waiters)

    def has_room(self) -> bool:
        """Whether a request would start at once."""
        return self.limit is None or (self.active < self.limit and not self._waiters)

    async def acquire(self, max_queue: int, timeout_s: float, target: str) -> None:
        """Take a place: at once when there is room, else in line (`worker_overloaded` when the line is full or
        the wait passes `timeout_s`)."""
        if self.has_room():
            self.active += 1
            return
        if len(self._waiters) >= max_queue or timeout_s <= 0:
            raise worker_overloaded(target, timeout_s or 1.0)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(timeout_s):
                await fut  # `release` hands its place over: `active` already counts it
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a place just as the wait ended: pass it on
            else:
                fut.cancel()
                self._waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                raise worker_overloaded(target, timeout_s) from None
            raise

    def release(self) -> None:
        """Give a place back: to the first waiter in line, else free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1


class RetryBudget:
    """Tokens for re-sending requests (see the module docstring), counted in one-second buckets."""

    WINDOW_S = 10

    def __init__(self, cfg: ReliabilityConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio, self.min_per_s, self.clock = cfg.retry_budget_ratio, cfg.retry_budget_min_per_s, clock
        self._requests: collections.deque[tuple[int, int]] = collections.deque()  # (second, count)
        self._spent: collections.deque[tuple[int, int]] = collections.deque()

    def _bump(self, buckets: collections.deque[tuple[int, int]]) -> None:
        now = int(self.clock())
        if buckets and buckets[-1][0] == now:
            buckets[-1] = (now, buckets[-1][1] + 1)
        else:
            buckets.append((now, 1))

    def _count(self, buckets: collections.deque[tuple[int, int]]) -> int:
        oldest = int(self.clock()) - self.WINDOW_S + 1
        while buckets and buckets[0][0] < oldest:
            buckets.popleft()
        return sum(n for _, n in buckets)

    def request(self) -> None:
        """A request arrived (it adds `ratio` of a token)."""
        self._bump(self._requests)

    def try_spend(self) -> bool:
        """Take a token for one re-send; False when the budget is spent."""
        allowed = self.ratio * self._count(self._requests) + self.min_per_s * self.WINDOW_S
        if self._count(self._spent) + 1 > allowed:
            return False
        self._bump(self._spent)
        return True
