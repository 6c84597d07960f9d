"""Prometheus metrics of the gateway, on a registry owned by one app instance.

Label values come from bounded sets only (policy, model, worker, status, reason); never a prompt, key or id.
Counters are exported with the `_total` suffix prometheus-client adds (`turnout_requests_total`, ...).

The gateway runs as one process per container (uvicorn, one worker): its routing state (embedding cache,
bandit sums, affinity, in-flight counts) lives in that process, so several worker processes behind one port
would each see a slice of it. Scale by running more gateway containers, each scraped on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from routers.bandit import BanditRouter
from server.workers import Health

if TYPE_CHECKING:  # only for annotations: the state module builds this one
    from server.config import TurnoutConfig
    from server.state import Live

# Gateway overhead, routing, embedding and scoring are milliseconds; generation is seconds to minutes.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
                    0.25, 1.0)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """The gateway's metric families. `enabled=False` keeps the families (so `/metrics` still answers) but the
    request path records nothing: the load benchmark measures what recording costs."""

    def __init__(self, registry: CollectorRegistry | None = None, *, enabled: bool = True) -> None:
        # The `*_created` series add a sample per label set and nothing a dashboard uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.enabled = enabled
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "turnout_requests", "Requests by policy, model, worker and final status.",
            ["policy", "model", "worker", "status"], registry=r,
        )
        self.latency = Histogram(
            "turnout_request_duration_seconds", "End-to-end request latency.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "turnout_time_to_first_token_seconds", "Time to the first streamed token.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.overhead = Histogram(
            "turnout_gateway_overhead_seconds", "Gateway time excluding time spent waiting on the worker.",
            buckets=OVERHEAD_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter(
            "turnout_prompt_tokens", "Prompt tokens, from the workers' usage.", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "turnout_completion_tokens", "Completion tokens, from the workers' usage.", ["model"], registry=r
        )
        self.cost = Counter(
            "turnout_cost_usd", "Cost in USD (usage tokens x configured prices).", ["model", "policy"], registry=r
        )
        # Two counters rather than one "savings" counter: savings are negative whenever a request goes to a model
        # dearer than the reference, and a counter may only go up. Savings = reference cost - cost.
        self.reference_cost = Counter(
            "turnout_reference_cost_usd", "What the same tokens would have cost on the reference model "
            "(server.reference_model).", ["model", "policy"], registry=r,
        )
        self.savings = Gauge(
            "turnout_savings_usd", "Reference cost minus cost since the gateway started (negative when routing "
            "spent more than the reference model would have).", ["policy"], registry=r,
        )
        self.upstream_errors = Counter(
            "turnout_upstream_errors", "Failed exchanges with workers, by reason.", ["worker", "reason"],
            registry=r,
        )
        self.fallbacks = Counter(
            "turnout_fallbacks", "Requests moved to the policy's next candidate after the chosen model failed "
            "before its first byte.", ["policy", "from_model", "to_model", "reason"], registry=r,
        )
        self.retries = Counter(
            "turnout_retries", "Requests sent again to the same model after its worker failed before the first "
            "byte.", ["model", "reason"], registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "turnout_retry_budget_exhausted", "Retries and fallbacks not made because the retry budget was spent.",
            registry=r,
        )
        self.breaker_transitions = Counter(
            "turnout_breaker_transitions", "Circuit breaker state changes, by worker and new state.",
            ["worker", "state"], registry=r,
        )
        self.in_flight = Gauge("turnout_in_flight_requests", "Requests in progress.", registry=r)
        self.decisions = Counter(
            "turnout_routing_decisions", "Routing decisions by policy, chosen model and how (policy or affinity).",
            ["policy", "model", "how"], registry=r,
        )
        self.routing = Histogram(
            "turnout_routing_duration_seconds", "Time to decide a route (embedding + scoring).", ["policy"],
            buckets=OVERHEAD_BUCKETS, registry=r,
        )
        self.embedding = Histogram(
            "turnout_embedding_duration_seconds", "Time a request waited for its prompt's embedding, by whether "
            "the embedding cache had it.", ["cache"], buckets=OVERHEAD_BUCKETS, registry=r,
        )
        self.scoring = Histogram(
            "turnout_scoring_duration_seconds", "Time a policy (and its shadow) took to score the candidates.",
            ["policy"], buckets=OVERHEAD_BUCKETS, registry=r,
        )
        self.shadow_decisions = Counter(
            "turnout_shadow_decisions", "Requests by live policy's and shadow policy's choices.",
            ["policy", "shadow", "live_model", "shadow_model"], registry=r,
        )
        self.shadow_disagreements = Counter(
            "turnout_shadow_disagreements", "Requests on which the shadow policy chose another model than the "
            "live one.", ["policy", "shadow"], registry=r,
        )
        self.feedback = Counter(
            "turnout_feedback", "Feedback received, by policy and result.", ["policy", "result"], registry=r,
        )
        self.reloads = Counter("turnout_config_reloads", "Config reloads by result.", ["result"], registry=r)
        self.limited = Counter(
            "turnout_limited_requests", "Requests refused (429) by a key's limit.", ["key", "limit"], registry=r,
        )
        self.store_up = Gauge("turnout_store_up", "1 when the last shared-state operation reached the store.",
                              registry=r)
        self.store_up.set(1)
        self.store_errors = Counter(
            "turnout_store_errors", "Shared-state operations that failed to reach the store (then served by this "
            "replica's own state, or refused, as state.on_failure says).", ["op"], registry=r,
        )

    def prime(self, config: TurnoutConfig) -> None:
        """Create the per-model and per-policy series at 0 before the first request (and for models or
        policies a reload adds): a series that first appears with its first increment already in it shows no
        increase to `rate()`, so the first requests would be missing from every per-hour panel."""
        models = sorted({w.model for w in config.workers})
        policies = ["", *config.policies]  # "" = requests that named a worker or model directly
        for model in models:
            self.prompt_tokens.labels(model)
            self.completion_tokens.labels(model)
            for policy in policies:
                self.cost.labels(model, policy)
                self.reference_cost.labels(model, policy)
        for policy in policies:
            self.savings.labels(policy)

    def watch(self, live: Callable[[], Live]) -> None:
        """Export the workers' state and the policies' budgets of whatever config is live at scrape time."""
        self.registry.register(LiveCollector(live))


class LiveCollector(Collector):
    """Gauges read from the live snapshot when Prometheus scrapes: worker health and queues (the queues as last
    read from each vLLM worker's /metrics), this gateway's in-flight requests per worker, and policy budgets."""

    def __init__(self, live: Callable[[], Live]) -> None:
        self.live = live

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The current values (called by prometheus-client on every scrape)."""
        live = self.live()
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
        for w in live.registry.workers.values():
            key = [w.name, w.model]
            up.add_metric(key, 1.0 if w.health is Health.UP else 0.0)
            in_flight.add_metric(key, float(w.in_flight))
            queued.add_metric(key, float(w.gate.waiting))
            breaker.add_metric(key, float(w.breaker.state.value))
            # Unknown stays absent rather than 0: a worker whose /metrics cannot be read has no queue to show.
            for family, value in ((running, w.running), (waiting, w.waiting), (kv, w.kv_cache_usage)):
                if value is not None:
                    family.add_metric(key, float(value))
        budget = GaugeMetricFamily("turnout_policy_budget_usd_per_hour",
                                   "A policy's configured spending budget (budget_usd_per_hour).", labels=["policy"])
        for name, spec in live.config.policies.items():
            value = getattr(spec, "budget_usd_per_hour", None)
            if value is not None:
                budget.add_metric([name], float(value))
        learned = GaugeMetricFamily("turnout_policy_online_observations",
                                    "Feedback a learning policy has learned from online, merged over replicas.",
                                    labels=["policy"])
        for name, router in live.table.routers.items():
            if isinstance(router, BanditRouter):
                learned.add_metric([name], router.bandit.online_observations())
        yield from (up, running, waiting, kv, in_flight, queued, breaker, budget, learned)
