"""Everything one running gateway holds, built in the app's lifespan and closed with it."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from server.accounting import Recorder
from server.config import TurnoutConfig, UpstreamConfig
from server.metrics import Metrics
from server.routing import RoutingTable
from server.workers import HealthMonitor, WorkerRegistry


def make_client(cfg: UpstreamConfig) -> httpx.AsyncClient:
    """The one pooled HTTP client to all workers, with explicit timeouts and limits."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=cfg.connect_timeout_s, read=cfg.read_timeout_s,
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


@dataclass
class GatewayState:
    """The gateway's live parts. `table` is replaced whole on reload; requests take one snapshot."""

    config: TurnoutConfig
    table: RoutingTable
    registry: WorkerRegistry
    client: httpx.AsyncClient
    metrics: Metrics
    recorder: Recorder
    health: HealthMonitor

    @classmethod
    def build(cls, config: TurnoutConfig, client: httpx.AsyncClient | None = None) -> GatewayState:
        """Build every part from a validated config."""
        client = client or make_client(config.upstream)
        registry = WorkerRegistry(config)
        metrics = Metrics()
        return cls(
            config=config,
            table=RoutingTable(config),
            registry=registry,
            client=client,
            metrics=metrics,
            recorder=Recorder(metrics),
            health=HealthMonitor(registry, config.server.health_interval_s, config.server.health_timeout_s,
                                 config.server.health_failures_to_down),
        )

    async def aclose(self) -> None:
        """Stop background work and close the client."""
        await self.health.stop()
        await self.client.aclose()
