"""Gauges read at scrape time from the live config's workers and policies (`LiveReading`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from server.telemetry.readings import LiveReading

#: `turnout_worker_breaker_state`'s values.
BREAKER_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class LiveCollector(Collector):
    """Gauges read from the live snapshot when Prometheus scrapes: worker health and queues (the queues as last
    read from each vLLM worker's /metrics), this gateway's in-flight requests per worker, and policy budgets."""

    def __init__(self, reading: Callable[[], LiveReading]) -> None:
        self.reading = reading

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The current values (called by prometheus-client on every scrape)."""
        live = self.reading()
        labels = ["worker", "model"]
        up = GaugeMetricFamily("turnout_worker_up", "1 when the worker's health check passes.", labels=labels)
        running = GaugeMetricFamily("turnout_worker_requests_running",
                                    "Requests the worker reports running (vLLM's num_requests_running).", labels=labels)
        waiting = GaugeMetricFamily("turnout_worker_requests_waiting",
                                    "Requests the worker reports queued (vLLM's num_requests_waiting).", labels=labels)
        kv = GaugeMetricFamily("turnout_worker_kv_cache_usage",
                               "KV-cache usage the worker reports, 0..1 (vLLM's kv_cache_usage_perc).", labels=labels)
        in_flight = GaugeMetricFamily("turnout_worker_in_flight_requests",
                                      "Requests this gateway has open at the worker.", labels=labels)
        queued = GaugeMetricFamily("turnout_worker_queued_requests",
                                   "Requests waiting for a place at the worker (its max_concurrency).", labels=labels)
        breaker = GaugeMetricFamily("turnout_worker_breaker_state",
                                    "The worker's circuit breaker: 0 closed, 1 half-open, 2 open.", labels=labels)
        for w in live.workers:
            key = [w.name, w.model]
            up.add_metric(key, 1.0 if w.up else 0.0)
            in_flight.add_metric(key, float(w.in_flight))
            queued.add_metric(key, float(w.queued))
            breaker.add_metric(key, BREAKER_VALUES[w.breaker])
            # Unknown stays absent rather than 0: a worker whose /metrics cannot be read has no queue to show.
            for family, value in ((running, w.running), (waiting, w.waiting), (kv, w.kv_cache_usage)):
                if value is not None:
                    family.add_metric(key, float(value))
        budget = GaugeMetricFamily("turnout_policy_budget_usd_per_hour",
                                   "A policy's configured spending budget (budget_usd_per_hour).", labels=["policy"])
        for name, value in live.budgets_usd_per_hour.items():
            budget.add_metric([name], value)
        learned = GaugeMetricFamily("turnout_policy_online_observations",
                                    "Feedback a learning policy has learned from online, merged over replicas.",
                                    labels=["policy"])
        for name, count in live.online_observations.items():
            learned.add_metric([name], count)
        yield from (up, running, waiting, kv, in_flight, queued, breaker, budget, learned)
