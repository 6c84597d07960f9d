"""The worker registry: runtime state of each upstream, replica choice, and the health monitor.

A routing policy chooses a *model* (or names one worker); the registry then picks the replica: among the
workers not known to be down, the one with the least load. Load is what the worker itself reports (vLLM's
running and waiting requests, polled by `server.upstream.load.LoadMonitor`) when that is fresh, plus the requests
this gateway has sent since, so several gateways sharing workers still spread by the workers' real queues.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import httpx

from server.config import ReliabilityConfig, TurnoutConfig, WorkerConfig
from server.errors import no_worker_available
from server.tasks import cancel_and_wait
from server.telemetry.readings import WorkerReading
from server.upstream.resilience import Breaker, BreakerState, EffectiveTimeouts, Gate, RetryBudget

log = logging.getLogger("turnout.workers")


class Health(enum.Enum):
    """What the last health check found."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


@dataclass(eq=False)
class Worker:
    """One upstream worker and what the gateway knows of it right now."""

    config: WorkerConfig
    health: Health = Health.UNKNOWN
    in_flight: int = 0
    last_error: str | None = None
    checked_at: float | None = None
    failures: int = 0  # consecutive failed health checks
    failed_at: float = 0.0  # time.monotonic() of its last failed request or health check (0: never)
    auth_headers: dict[str, str] = field(default_factory=dict)
    # The worker's own queue, from its /metrics (None until read, or when it has none).
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    load_at: float | None = None  # time.monotonic() of the last successful read
    load_error: str | None = None
    # This gateway's own in-flight requests on the same server when `running`/`waiting` were read, and the
    # workers that share that server (one vLLM serving several model names): see `load`.
    own_at_load: int = 0
    load_peers: tuple[Worker, ...] = field(default=(), repr=False)
    breaker: Breaker = field(default_factory=lambda: Breaker(5, 10.0))
    gate: Gate = field(default_factory=lambda: Gate(None))
    timeouts: EffectiveTimeouts = field(default_factory=lambda: EffectiveTimeouts(5.0, 60.0, 60.0, 600.0))

    def available(self) -> bool:
        """Whether requests may go here: not found down by its health check, its breaker not open."""
        return self.health is not Health.DOWN and self.breaker.available()

    def own_in_flight(self) -> int:
        """This gateway's requests in flight on this worker's server (its peers' included)."""
        return sum(p.in_flight for p in self.load_peers) if self.load_peers else self.in_flight

    def load(self, fresh_s: float = 10.0) -> float:
        """Requests on this worker's server: everyone else's as it last reported (read within `fresh_s`) plus
        this gateway's own right now.

        The report is up to one poll old. Taken as it stands, a request of ours caught running would still
        count for a second after it finished, and a request just sent would not count at all; so the share
        that was ours at the reading is swapped for our count now, which the gateway knows exactly."""
        own = self.own_in_flight()
        if self.load_at is None or time.monotonic() - self.load_at > fresh_s:
            return float(own)
        others = max(0.0, (self.running or 0.0) + (self.waiting or 0.0) - self.own_at_load)
        return others + own

    def queue(self, fresh_s: float = 10.0) -> float:
        """Requests waiting at this worker (not yet running), as it last reported; 0 when unknown."""
        if self.load_at is not None and time.monotonic() - self.load_at <= fresh_s:
            return self.waiting or 0.0
        return 0.0

    @property
    def name(self) -> str:
        """The worker's configured name."""
        return self.config.name

    @property
    def model(self) -> str:
        """The model name the worker serves."""
        return self.config.model

    def reading(self) -> WorkerReading:
        """This worker's state now, as telemetry reads it."""
        return WorkerReading(
            name=self.name, model=self.model, health=self.health.value, in_flight=self.in_flight,
            queued=self.gate.waiting, breaker=self.breaker.state.name.lower(), running=self.running,
            waiting=self.waiting, kv_cache_usage=self.kv_cache_usage, error=self.last_error,
        )

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count a request as in flight on this worker for the duration of the block."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


Verdict = Literal["ok", "failed", "neutral"]


class Lease:
    """One attempt's hold on a worker: its breaker's probe turn, a place at its gate and its in-flight count,
    given back by `end` (idempotent) with the verdict the breaker hears: "ok" (the worker answered, a client
    error included), "failed" (unreachable, timed out, 5xx, a stream broken off) or "neutral" (it says nothing
    about the worker: the client went away)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._ended = False

    @classmethod
    async def take(cls, worker: Worker, reliability: ReliabilityConfig) -> Lease:
        """Hold a place at `worker` (waiting in its bounded line; `worker_overloaded` when there is none)."""
        worker.breaker.begin()  # before any wait: the one half-open probe is claimed at once
        try:
            await worker.gate.acquire(reliability.max_queue, reliability.queue_timeout_s, worker.model)
        except BaseException:
            worker.breaker.release()
            raise
        worker.in_flight += 1
        return cls(worker)

    def end(self, verdict: Verdict) -> None:
        """Give the place back and tell the breaker."""
        if self._ended:
            return
        self._ended = True
        w = self.worker
        w.in_flight -= 1
        w.gate.release()
        if verdict == "ok":
            w.breaker.success()
        elif verdict == "failed":
            w.failed_at = time.monotonic()
            w.breaker.failure()
        else:
            w.breaker.release()


class WorkerRegistry:
    """Workers by name and by model, and the choice of a replica."""

    def __init__(self, config: TurnoutConfig, previous: WorkerRegistry | None = None,
                 on_breaker: Callable[[Worker, BreakerState, BreakerState], None] | None = None) -> None:
        """Workers of `config`; with `previous` (a reload), a worker whose config is unchanged is the same
        object, so its health, load, in-flight count, breaker and queue carry over. `on_breaker` hears every
        breaker transition."""
        self.workers: dict[str, Worker] = {}
        self.by_model: dict[str, list[Worker]] = {}
        self.reliability: ReliabilityConfig = config.reliability
        # Re-sends are budgeted per config: a reload starts a new budget with the new settings.
        self.retry_budget = RetryBudget(config.reliability)
        for wc in config.workers:
            old = previous.workers.get(wc.name) if previous is not None else None
            if old is not None and old.config == wc:
                old.timeouts = EffectiveTimeouts.of(config.upstream, wc)
                old.breaker.failures_to_open = config.reliability.breaker_failures
                old.breaker.open_s = config.reliability.breaker_open_s
                self.workers[wc.name] = old
                self.by_model.setdefault(wc.model, []).append(old)
                continue
            headers: dict[str, str] = {}
            if wc.api_key_env:
                # Secrets come from the environment only; a missing variable means no auth header.
                key = os.environ.get(wc.api_key_env)
                if key:
                    headers["authorization"] = f"Bearer {key}"
                else:
                    log.warning("worker %s: environment variable %s is not set; sending no API key",
                                wc.name, wc.api_key_env)
            worker = Worker(config=wc, auth_headers=headers, gate=Gate(wc.max_concurrency),
                            timeouts=EffectiveTimeouts.of(config.upstream, wc))
            worker.breaker = Breaker(config.reliability.breaker_failures, config.reliability.breaker_open_s,
                                     on_change=self._breaker_hook(worker, on_breaker))
            self.workers[wc.name] = worker
            self.by_model.setdefault(wc.model, []).append(worker)

    @staticmethod
    def _breaker_hook(worker: Worker, on_breaker: Callable[[Worker, BreakerState, BreakerState], None] | None,
                      ) -> Callable[[BreakerState, BreakerState], None]:
        def hook(old: BreakerState, new: BreakerState) -> None:
            level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
            log.log(level, "worker %s: breaker %s -> %s (%d failed requests in a row)", worker.name,
                    old.name.lower(), new.name.lower(), worker.breaker.failures)
            if on_breaker is not None:
                on_breaker(worker, old, new)
        return hook

    def models(self) -> list[str]:
        """Distinct served model names, in config order."""
        return list(self.by_model)

    def resolve(self, target: str) -> list[Worker]:
        """Workers that can serve `target`: that worker if it names one, else every replica of that model."""
        if target in self.workers:
            return [self.workers[target]]
        return list(self.by_model.get(target, ()))

    def usable(self, target: str) -> list[Worker]:
        """Workers for `target` that may take requests: not found down, breaker not open (see `Worker.available`)."""
        return [w for w in self.resolve(target) if w.available()]

    def queue(self, target: str) -> float:
        """Requests waiting at the least loaded usable worker for `target` (what a new request would join)."""
        usable = self.usable(target)
        return min(w.queue() for w in usable) if usable else 0.0

    def pick(self, target: str, avoid: frozenset[str] = frozenset(), panic: bool = True) -> Worker:
        """The replica for `target`: available (see `Worker.available`), not in `avoid` (replicas that already
        failed this request) unless nothing else is, with room before queueing, then least loaded, random
        among ties. When none is available: panic mode (`panic_pick`), unless `panic` is False (the request has
        somewhere better to go: a fallback with an available worker)."""
        usable = self.usable(target)
        if not usable:
            if not panic:
                raise no_worker_available(target)
            return self.panic_pick(target, avoid)
        usable = [w for w in usable if w.name not in avoid] or usable
        usable = [w for w in usable if w.gate.has_room()] or usable
        if len(usable) == 1:
            return usable[0]
        loads = [w.load() for w in usable]
        least = min(loads)
        return random.choice([w for w, load in zip(usable, loads, strict=True) if load == least])

    def panic_pick(self, target: str, avoid: frozenset[str] = frozenset()) -> Worker:
        """No worker for `target` is available: with `reliability.panic`, the one that failed least recently
        among those this request has not yet tried (its breaker open or its health check failing may be stale,
        and a try costs less than a refusal); `no_healthy_worker` otherwise, or when every one was tried."""
        left = [w for w in self.resolve(target) if w.name not in avoid] if self.reliability.panic else []
        if not left:
            raise no_worker_available(target)
        return min(left, key=lambda w: w.failed_at)

    def reachable(self, target: str) -> bool:
        """Whether a request for `target` may be sent: a worker is available, or panic mode would try one."""
        return bool(self.usable(target)) or (self.reliability.panic and bool(self.resolve(target)))

    def any_up(self) -> bool:
        """True when at least one worker passed its last health check."""
        return any(w.health is Health.UP for w in self.workers.values())


class WorkerPoller:
    """Visits every worker of the current registry every `interval` seconds in a background task.

    It has its own small HTTP client: checks must not queue behind (or be refused by) a request pool that is
    full of long streams, which would misjudge workers exactly under load. Subclasses define `visit`.
    """

    #: Names the background task and the log line of a failed round.
    task_name = "turnout-poller"

    def __init__(self, registry: WorkerRegistry, interval_s: float, timeout_s: float,
                 client: httpx.AsyncClient | None = None) -> None:
        self.registry = registry  # replaced on reload
        self.interval = interval_s
        self._timeout = timeout_s
        self._client = client or httpx.AsyncClient(
            timeout=timeout_s, limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            trust_env=False,
        )
        self._task: asyncio.Task[None] | None = None

    async def visit(self, worker: Worker) -> None:
        """Look at one worker now. Must never raise."""
        raise NotImplementedError

    async def visit_all(self) -> None:
        """Visit every worker concurrently."""
        await asyncio.gather(*(self.visit(w) for w in self.registry.workers.values()))

    async def _run(self) -> None:
        while True:
            try:
                await self.visit_all()
            except Exception:  # a bug here must not stop polling for good
                log.exception("%s: round failed", self.task_name)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Start polling (the first round runs at once)."""
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        """Stop polling and close the client."""
        await cancel_and_wait(self._task)
        self._task = None
        await self._client.aclose()


class HealthMonitor(WorkerPoller):
    """Polls each worker's health URL and records the result on the worker, with hysteresis: a worker that
    was up goes down only after `failures_to_down` failed checks in a row."""

    task_name = "turnout-health"

    def __init__(self, registry: WorkerRegistry, interval_s: float, timeout_s: float, failures_to_down: int,
                 client: httpx.AsyncClient | None = None) -> None:
        super().__init__(registry, interval_s, timeout_s, client)
        self.failures_to_down = failures_to_down

    async def visit(self, worker: Worker) -> None:
        """Check one worker now. Never raises: any failure marks the check failed."""
        try:
            resp = await self._client.get(worker.config.resolved_health_url(), headers=worker.auth_headers,
                                          timeout=self._timeout)
            ok = resp.status_code == 200
            error = None if ok else f"health check answered {resp.status_code}"
        except Exception as exc:  # any failure to check is a failed check
            ok, error = False, f"health check failed: {type(exc).__name__}"
        worker.checked_at = time.time()
        worker.last_error = error
        if ok:
            if worker.health is not Health.UP:
                log.info("worker %s is up", worker.name)
            worker.health, worker.failures = Health.UP, 0
            return
        worker.failures += 1
        # A worker not yet seen up is down at once; one that was up gets the benefit of the doubt.
        if worker.health is not Health.UP or worker.failures >= self.failures_to_down:
            if worker.health is not Health.DOWN:
                log.warning("worker %s is down (%s)", worker.name, error)
            worker.health = Health.DOWN
            worker.failed_at = time.monotonic()
