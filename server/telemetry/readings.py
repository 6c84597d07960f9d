"""What the scrape-time gauges and the status page read of the running gateway, as plain values.

Telemetry sits below the parts it reports on (workers, policies), so it never reads them directly: the
snapshot (`server.snapshot.Live.reading`) hands it these values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkerReading:
    """One worker as the gateway sees it now."""

    name: str
    model: str
    health: str  # "up", "down" or "unknown": what its last health check found
    in_flight: int  # this gateway's requests open at it
    queued: int  # requests waiting for a place at it (its max_concurrency)
    breaker: str  # its circuit breaker: "closed", "half_open" or "open"
    # Its own queue, as last read from its /metrics (None: unknown).
    running: float | None
    waiting: float | None
    kv_cache_usage: float | None
    error: str | None  # the last health check's error

    @property
    def up(self) -> bool:
        """Whether its last health check passed."""
        return self.health == "up"


@dataclass(frozen=True, slots=True)
class LiveReading:
    """The live config's workers and policies, read at one moment."""

    generation: int
    reference_model: str
    workers: list[WorkerReading]
    budgets_usd_per_hour: dict[str, float]  # policy -> its configured spending budget
    online_observations: dict[str, float]  # learning policy -> feedback learned from online
