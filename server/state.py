"""Everything one running gateway holds, built in the app's lifespan and closed with it.

What a config defines (the config itself, its policies, its workers) sits in one immutable `Live` snapshot.
A reload builds a complete new snapshot off to the side and swaps one reference; each request reads the
snapshot once and keeps it to the end, so requests in flight finish on the config they started with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from routers.embed_cache import model_cache_dir
from routers.embedders import Embedder, make_embedder
from routers.embedders import embedder_id as embedder_id_of  # `embedder_id` is a parameter name here
from server.accounting import Recorder
from server.bandit_sync import BanditSync
from server.config import ConfigError, StateConfig, TurnoutConfig, UpstreamConfig, load_config
from server.embedding import EmbeddingService
from server.feedback import FeedbackBook
from server.keys import KeyBook
from server.keystore import StoredKeys
from server.limits import Limits
from server.load import LoadMonitor
from server.metrics import Metrics
from server.redis_store import RedisStore
from server.resilience import BreakerState, RetryBudget
from server.routing import RoutingTable, artifact_context
from server.sessions import AffinityStore
from server.shared import StoreGuard
from server.status import StatusBook
from server.store import MemoryStore, Store
from server.workers import HealthMonitor, Worker, WorkerRegistry

log = logging.getLogger("turnout.state")


def make_store(cfg: StateConfig, environ: Mapping[str, str] | None = None, max_entries: int = 1_000_000) -> Store:
    """The configured state store: this process's memory (its feedback and affinity entries bounded by
    `max_entries`), or Redis at the URL in `cfg.url_env`."""
    if cfg.backend == "memory":
        return MemoryStore(max_entries=max_entries)
    url = (os.environ if environ is None else environ).get(cfg.url_env)
    if not url:
        raise ConfigError([f"state.url_env: the environment variable {cfg.url_env} (the Redis URL) is not set"])
    return RedisStore(url, timeout_s=cfg.timeout_ms / 1000)


def make_client(cfg: UpstreamConfig) -> httpx.AsyncClient:
    """The one pooled HTTP client to all workers, with explicit timeouts and limits."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            # Each request sets its worker's own connect timeout; reads are bounded by the request's TTFT, idle and
            # total timeouts (`server.resilience.EffectiveTimeouts`), the read timeout here is only a backstop.
            connect=cfg.connect_timeout_s, read=cfg.total_timeout_s,
            write=cfg.write_timeout_s, pool=cfg.pool_timeout_s,
        ),
        limits=httpx.Limits(
            max_connections=cfg.max_connections,
            max_keepalive_connections=cfg.max_keepalive_connections,
            keepalive_expiry=cfg.keepalive_expiry_s,
        ),
        # The gateway talks to its own workers; proxies from the environment must not intercept that.
        trust_env=False,
    )


@dataclass(frozen=True)
class Live:
    """One config's worth of gateway: the config, its policies and its workers."""

    config: TurnoutConfig
    table: RoutingTable
    registry: WorkerRegistry
    generation: int
    loaded_at: float
    keys: KeyBook


def needs_embedder(config: TurnoutConfig) -> bool:
    """Whether any policy type of `config` looks at prompt embeddings (before building anything)."""
    return any(spec.type in ("knn", "cost_aware", "bandit") for spec in config.policies.values())


def build_table(config: TurnoutConfig, config_path: str | Path | None, embedder_id: str | None,
                source: str = "config") -> RoutingTable:
    """The routing table of `config` (`ConfigError` listing every policy that cannot be built)."""
    return RoutingTable(config, artifact_context(config_path, embedder_id), source)


def check_config_file(path: str | Path, embedder_id: str | None = None) -> TurnoutConfig:
    """Load a config and build its policies (loading artifacts) without starting anything; what
    `turnout check-config` and a reload run. Artifacts must match `embedder_id` (default: the configured
    embedder's). `ConfigError` lists every problem."""
    config = load_config(path)
    if embedder_id is None and needs_embedder(config):
        embedder_id = embedder_id_of(config.embedder.spec())  # an id, without loading the model
    build_table(config, path, embedder_id, str(path))
    return config


class GatewayState:
    """The gateway's live parts. `live` is replaced whole on reload."""

    def __init__(self, config: TurnoutConfig, *, config_path: str | Path | None = None,
                 client: httpx.AsyncClient | None = None, embedder: Embedder | None = None) -> None:
        """Build every part from a validated config (`ConfigError` if a policy cannot be built)."""
        self.config_path = config_path
        self.client = client or make_client(config.upstream)
        self.metrics = Metrics(enabled=config.server.metrics)
        self.status = StatusBook()
        self.recorder = Recorder(self.metrics, self.status)
        self.embedding: EmbeddingService | None = None
        if embedder is not None or needs_embedder(config):
            self.embedding = self._make_embedding(config, embedder)
        registry = WorkerRegistry(config, on_breaker=self._on_breaker)
        self.retry_budget = RetryBudget(config.reliability)
        table = build_table(config, config_path, self.embedding.id if self.embedding else None,
                            str(config_path or "config"))
        # Feedback records and affinity are bounded in a memory store (Redis bounds them by their TTLs).
        bound = 2 * config.server.feedback_max_requests
        self.store = make_store(config.state, max_entries=bound)
        self.guard = StoreGuard(self.store, config.state.on_failure, self.metrics, max_entries=bound)
        self.limits = Limits(self.guard)
        self.stored_keys = StoredKeys()
        self.live = Live(config, table, registry, generation=1, loaded_at=time.time(), keys=KeyBook(config.auth))
        self.metrics.watch(lambda: self.live)
        self.metrics.prime(config)
        srv = config.server
        self.health = HealthMonitor(registry, srv.health_interval_s, srv.health_timeout_s, srv.health_failures_to_down)
        self.load = LoadMonitor(registry, srv.load_interval_s, srv.health_timeout_s)
        self.feedback = FeedbackBook(self.guard, srv.feedback_ttl_s)
        self.bandit_sync = BanditSync(self.guard, config.state.sync_interval_s, lambda: self.live)
        self.affinity = AffinityStore(self.guard)
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
        return EmbeddingService(embedder or make_embedder(e.spec(), model_cache_dir()), cache_size=e.cache_size,
                                max_batch=e.max_batch, max_wait_ms=e.wait_ms())

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
            self.retry_budget = RetryBudget(config.reliability)
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
