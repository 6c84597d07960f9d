"""Prometheus metrics of the gateway, on a registry owned by one app instance.

Label values come from bounded sets only (policy, model, worker, status); never a prompt, key or id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# Gateway overhead is milliseconds; generation is seconds to minutes.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """The gateway's metric families."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The `*_created` series add a sample per label set and nothing a dashboard uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]
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
        self.upstream_errors = Counter(
            "turnout_upstream_errors", "Failed exchanges with workers, by reason.", ["worker", "reason"],
            registry=r,
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
        self.shadow_decisions = Counter(
            "turnout_shadow_decisions", "Requests by live policy's and shadow policy's choices.",
            ["policy", "shadow", "live_model", "shadow_model"], registry=r,
        )
        self.feedback = Counter(
            "turnout_feedback", "Feedback received, by policy and result.", ["policy", "result"], registry=r,
        )
        self.reloads = Counter("turnout_config_reloads", "Config reloads by result.", ["result"], registry=r)
