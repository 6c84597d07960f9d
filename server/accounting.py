"""The record of one request and where it goes when the request ends: metrics and one JSON log line."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.config import Price
from server.metrics import Metrics

request_log = logging.getLogger("turnout.requests")


@dataclass(slots=True)
class Exchange:
    """Everything the gateway learns about one request while serving it."""

    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    policy: str | None = None
    model: str | None = None
    worker: str | None = None
    reason: str | None = None
    stream: bool = False
    upstream_s: float = 0.0
    stream_overhead_s: float | None = None  # set when a stream's headers go out
    relay_s: float = 0.0  # the gateway's own work on a stream's chunks
    ttft_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    status: str = "ok"
    http_status: int = 200
    error: str | None = None
    finished: bool = False

    def overhead_s(self, now: float | None = None) -> float:
        """Time spent in the gateway, excluding time waiting on the worker. For a stream: the time before
        its headers went out plus the work on each relayed chunk (never the time spent streaming)."""
        if self.stream_overhead_s is not None:
            return self.stream_overhead_s + self.relay_s
        return max(0.0, (now if now is not None else time.perf_counter()) - self.started - self.upstream_s)

    def freeze_stream_overhead(self) -> None:
        """Fix the pre-stream overhead at the moment the stream's headers are sent."""
        self.stream_overhead_s = self.overhead_s()

    def headers(self) -> dict[str, str]:
        """The `x-turnout-*` response headers known so far."""
        return {
            "x-turnout-request-id": self.request_id,
            "x-turnout-model": self.worker or "",
            "x-turnout-policy": self.policy or "",
            "x-turnout-overhead-ms": f"{self.overhead_s() * 1000:.3f}",
        }

    def set_usage(self, usage: Any, price: Price | None) -> None:
        """Take token counts from an OpenAI `usage` object and price them."""
        if not isinstance(usage, dict):
            return
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(pt, int) and isinstance(ct, int):
            self.prompt_tokens, self.completion_tokens = pt, ct
            if price is not None:
                self.cost_usd = price.cost_usd(pt, ct)


class Recorder:
    """Turns a finished `Exchange` into metrics and a log line, exactly once per request."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def finish(self, ex: Exchange) -> None:
        """Record `ex`; later calls for the same exchange are ignored."""
        if ex.finished:
            return
        ex.finished = True
        m = self.metrics
        now = time.perf_counter()
        model = ex.model or ""
        policy = ex.policy or ""
        m.requests.labels(policy, model, ex.worker or "", ex.status).inc()
        if ex.model:
            m.latency.labels(model).observe(now - ex.started)
            if ex.ttft_s is not None:
                m.ttft.labels(model).observe(ex.ttft_s)
            if ex.prompt_tokens is not None and ex.completion_tokens is not None:
                m.prompt_tokens.labels(model).inc(ex.prompt_tokens)
                m.completion_tokens.labels(model).inc(ex.completion_tokens)
            if ex.cost_usd is not None:
                m.cost.labels(model, policy).inc(ex.cost_usd)
        m.overhead.observe(ex.overhead_s(now))
        if ex.status not in ("ok", "client_error") and ex.worker:
            m.upstream_errors.labels(ex.worker, ex.status).inc()
        if request_log.isEnabledFor(logging.INFO):
            request_log.info(orjson.dumps({
                "request_id": ex.request_id, "endpoint": ex.endpoint, "policy": ex.policy,
                "model": ex.model, "worker": ex.worker, "reason": ex.reason, "stream": ex.stream,
                "status": ex.status, "http_status": ex.http_status, "error": ex.error,
                "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens,
                "cost_usd": ex.cost_usd, "latency_ms": round((now - ex.started) * 1000, 3),
                "ttft_ms": None if ex.ttft_s is None else round(ex.ttft_s * 1000, 3),
                "overhead_ms": round(ex.overhead_s(now) * 1000, 3),
            }).decode())
