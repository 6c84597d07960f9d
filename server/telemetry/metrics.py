"""Prometheus metrics of the gateway, on a registry owned by one app instance.

Label values come from bounded sets only (policy, model, worker, status, reason); never a prompt, key or id.
Counters are exported with the `_total` suffix prometheus-client adds (`turnout_requests_total`, ...).

The gateway runs as one process per container (uvicorn, one worker): its routing state (embedding cache,
bandit sums, affinity, in-flight counts) lives in that process, so several worker processes behind one port
would each see a slice of it. Scale by running more gateway containers, each scraped on its own.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from server.config import TurnoutConfig
from server.telemetry.collectors import LiveCollector
from server.telemetry.readings import LiveReading

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
        self.panic_sends = Counter(
            "turnout_panic_sends", "Requests sent to a worker that was down or whose breaker was open, because no "
            "worker of its model was available (panic mode, `reliability.panic`).", ["worker"], registry=r,
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
        self.embedding_failures = Counter(
            "turnout_embedding_failures", "Requests whose prompt could not be embedded (the embedder failed or was "
            "down), so their policy's fallback answered them.", ["policy"], registry=r,
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
        self.hold_overruns = Counter(
            "turnout_hold_overruns", "Requests that cost more than their budget hold (a worst case the worker "
            "exceeded): charged what they spent, and logged.", ["key"], registry=r,
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
        for policy in config.policies:  # at 0, so that an alert on its rate has a series to read
            self.embedding_failures.labels(policy)

    def up(self, reachable: bool) -> None:
        """`StoreSignals`: whether the last shared-state operation reached the store."""
        self.store_up.set(1 if reachable else 0)

    def failed(self, op: str) -> None:
        """`StoreSignals`: shared-state operation `op` failed to reach the store."""
        self.store_errors.labels(op).inc()

    def watch(self, reading: Callable[[], LiveReading]) -> None:
        """Export the workers' state and the policies' budgets of whatever config is live at scrape time."""
        self.registry.register(LiveCollector(reading))
