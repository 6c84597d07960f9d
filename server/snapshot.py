"""`Live`: one config's worth of gateway (its config, routing table, workers and keys), immutable.

A reload builds a whole new snapshot off to the side and swaps one reference (`server.gateway`); each request
reads the snapshot once and keeps it to the end, so requests in flight finish on the config they started with.
This module sits above the concerns a snapshot holds (`policy`, `upstream`, `quota`) and below the gateway
and the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from routers.bandit import BanditRouter
from routers.embedding.factory import embedder_id as embedder_id_of
from server.config import TurnoutConfig, load_config
from server.policy.table import RoutingTable, artifact_context
from server.quota.keys import KeyBook
from server.telemetry.readings import LiveReading
from server.upstream.workers import WorkerRegistry


@dataclass(frozen=True)
class Live:
    """One config's worth of gateway: the config, its policies and its workers."""

    config: TurnoutConfig
    table: RoutingTable
    registry: WorkerRegistry
    generation: int
    loaded_at: float
    keys: KeyBook

    def reading(self) -> LiveReading:
        """The workers' and policies' state now, for the scrape-time gauges and the status page."""
        budgets = {name: float(value) for name, spec in self.config.policies.items()
                   if (value := getattr(spec, "budget_usd_per_hour", None)) is not None}
        learned = {name: float(router.bandit.online_observations()) for name, router in self.table.routers.items()
                   if isinstance(router, BanditRouter)}
        return LiveReading(
            generation=self.generation, reference_model=self.config.reference[0],
            workers=[w.reading() for w in self.registry.workers.values()],
            budgets_usd_per_hour=budgets, online_observations=learned,
        )


def target_names(live: Live, target: str) -> list[str]:
    """Every name a target (a worker or a model) is known by: itself, its model, the workers serving it. A key's
    `models` list may name any of them."""
    workers = live.registry.resolve(target)
    return list(dict.fromkeys([target, *(w.model for w in workers), *(w.name for w in workers)]))


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
