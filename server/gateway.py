"""`GatewayState`: everything one running gateway holds, built in the app's lifespan and closed with it, and
the reload that swaps in a new config.

What a config defines (the config itself, its policies, its workers, its keys) sits in one immutable
`server.snapshot.Live`; the rest (the upstream client, metrics, the store, background pollers) lives as long
as the process. This module builds them all, so it sits above every concern and below the API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from routers.embedding.base import Embedder
from server.config import ConfigError, TurnoutConfig, load_config
from server.policy.affinity import AffinityStore
from server.policy.bandit_sync import BanditSync
from server.policy.embedding import STATIC_INLINE_CHARS, EmbeddingService, build_embedder
from server.policy.feedback import FeedbackBook
from server.quota.keys import GuessGuard, KeyBook
from server.quota.keystore import StoredKeys
from server.quota.limits import Limits
from server.snapshot import Live, build_table, needs_embedder
from server.store.factory import make_store
from server.store.guard import StoreGuard
from server.telemetry.metrics import Metrics
from server.telemetry.recorder import Recorder
from server.telemetry.status import StatusBook
from server.upstream.client import UpstreamClient
from server.upstream.forward import Forwarder
from server.upstream.load import LoadMonitor
from server.upstream.owners import ResponseOwners
from server.upstream.resilience import BreakerState
from server.upstream.workers import HealthMonitor, Worker, WorkerRegistry

log = logging.getLogger("turnout.state")


class GatewayState:
    """The gateway's live parts. `live` is replaced whole on reload."""

    def __init__(self, config: TurnoutConfig, *, config_path: str | Path | None = None,
                 client: UpstreamClient | None = None, embedder: Embedder | None = None) -> None:
        """Build every part from a validated config (`ConfigError` if a policy cannot be built)."""
        self.config_path = config_path
        self.client = client or UpstreamClient(config.upstream)
        self.metrics = Metrics(enabled=config.server.metrics)
        self.forwarder = Forwarder(self.client, self.metrics)
        self.status = StatusBook()
        self.recorder = Recorder(self.metrics, self.status)
        self.embedding: EmbeddingService | None = None
        if embedder is not None or needs_embedder(config):
            self.embedding = self._make_embedding(config, embedder)
        registry = WorkerRegistry(config, on_breaker=self._on_breaker)
        table = build_table(config, config_path, self.embedding.id if self.embedding else None,
                            str(config_path or "config"))
        # Feedback records and affinity are bounded in a memory store (Redis bounds them by their TTLs).
        bound = 2 * config.server.feedback_max_requests
        self.store = make_store(config.state, max_entries=bound)
        self.guard = StoreGuard(self.store, config.state.on_failure, self.metrics, max_entries=bound)
        self.limits = Limits(self.guard, self.metrics.limited, self.metrics.hold_overruns)
        self.stored_keys = StoredKeys()
        self.admin_guesses = GuessGuard()  # failed admin-key attempts, limited
        self.live = Live(config, table, registry, generation=1, loaded_at=time.time(), keys=KeyBook(config.auth))
        self.metrics.watch(lambda: self.live.reading())
        self.metrics.prime(config)
        srv = config.server
        self.health = HealthMonitor(registry, srv.health_interval_s, srv.health_timeout_s, srv.health_failures_to_down)
        self.load = LoadMonitor(registry, srv.load_interval_s, srv.health_timeout_s)
        self.feedback = FeedbackBook(self.guard, srv.feedback_ttl_s)
        self.bandit_sync = BanditSync(self.guard, config.state.sync_interval_s, lambda: self.live.table.routers)
        self.affinity = AffinityStore(self.guard)
        self.response_owners = ResponseOwners(self.guard)
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False

    @property
    def config(self) -> TurnoutConfig:
        """The config in force."""
        return self.live.config

    @staticmethod
    def _make_embedding(config: TurnoutConfig, embedder: Embedder | None) -> EmbeddingService:
        e = config.embedder
        inline = STATIC_INLINE_CHARS if embedder is None and e.backend == "static" else 0
        return EmbeddingService(embedder or build_embedder(e), cache_size=e.cache_size,
                                max_batch=e.max_batch, max_wait_ms=e.wait_ms(), max_chars=e.max_chars,
                                inline_chars=inline)

    def _on_breaker(self, worker: Worker, old: BreakerState, new: BreakerState) -> None:
        self.metrics.breaker_transitions.labels(worker.name, new.name.lower()).inc()

    def start(self, background_checks: bool = True) -> None:
        """Start the embedding batcher and (unless disabled) health and load polling."""
        if self.embedding is not None:
            self.embedding.start()
        self.bandit_sync.start()
        if background_checks:
            self.health.start()
            self.load.start()
        self._started = background_checks

    async def reload(self, config: TurnoutConfig | None = None) -> Live:
        """Swap in a new config (default: re-read the config file). On any problem raise `ConfigError`
        listing them all and leave the running config untouched."""
        async with self._reload_lock:
            source = str(self.config_path or "config")
            if config is None:
                if self.config_path is None:
                    raise ConfigError(["this gateway was started without a config file; nothing to re-read"])
                config = await asyncio.to_thread(load_config, self.config_path)
            old = self.live
            problems = []
            if config.upstream != old.config.upstream:
                problems.append("upstream: connection pool settings take effect only on restart")
            if config.embedder != old.config.embedder and (self.embedding is not None or needs_embedder(config)):
                problems.append("embedder: changing the embedder takes effect only on restart (artifacts must "
                                "match it)")
            if config.state != old.config.state:
                problems.append("state: changing the state store takes effect only on restart")
            if problems:
                raise ConfigError(problems, source)
            embedding = self.embedding or (self._make_embedding(config, None) if needs_embedder(config) else None)
            # Loading artifacts reads files: off the event loop, so requests keep flowing meanwhile.
            table = await asyncio.to_thread(build_table, config, self.config_path,
                                            embedding.id if embedding else None, source)
            if embedding is not None and self.embedding is None:
                self.embedding = embedding
                embedding.start()
            registry = WorkerRegistry(config, previous=old.registry, on_breaker=self._on_breaker)
            srv = config.server
            self.health.registry, self.load.registry = registry, registry
            self.health.interval, self.health.failures_to_down = srv.health_interval_s, srv.health_failures_to_down
            self.load.interval = srv.load_interval_s
            self.feedback.ttl_s = srv.feedback_ttl_s
            keys = KeyBook(config.auth)  # ConfigError when a key's environment variable is unset
            self.live = Live(config, table, registry, generation=old.generation + 1, loaded_at=time.time(),
                             keys=keys)
            self.metrics.prime(config)
            if self._started and any(w.health.value == "unknown" for w in registry.workers.values()):
                # New workers: learn their health now rather than at the next round.
                task = asyncio.create_task(self.health.visit_all())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            log.info("config reloaded (generation %d, %d policies)", self.live.generation, len(table.routers))
            return self.live

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, keeping a reference until it ends (settles after a response)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop background work and close the clients."""
        await self.health.stop()
        await self.load.stop()
        if self.embedding is not None:
            await self.embedding.stop()
        await self.client.aclose()
        await self.bandit_sync.stop()
        if self._tasks:  # settles of the last requests: let them reach the store before it closes
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.aclose()
