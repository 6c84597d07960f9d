"""`Recorder`: a finished request's metrics, its line on the status page, and its one JSON log line."""

from __future__ import annotations

import logging
from typing import Any

import orjson

from server.telemetry.metrics import Metrics
from server.telemetry.record import Exchange
from server.telemetry.status import StatusBook

request_log = logging.getLogger("turnout.requests")


class Recorder:
    """Turns a finished `Exchange` into metrics, status-page totals and a log line (`server.api.lifecycle` calls
    it once per request)."""

    def __init__(self, metrics: Metrics, status: StatusBook) -> None:
        self.metrics = metrics
        self.status = status

    def record(self, ex: Exchange, now: float) -> None:
        """Count the finished request `ex` in the metrics and on the status page."""
        if self.metrics.enabled:
            self._observe(ex, now)
        self.status.add(ex, now - ex.started)

    @staticmethod
    def log_line(ex: Exchange, now: float) -> None:
        """Write the request's one JSON line to the `turnout.requests` log."""
        if request_log.isEnabledFor(logging.INFO):
            request_log.info(orjson.dumps({
                "request_id": ex.request_id, "endpoint": ex.endpoint, "key": ex.key, "policy": ex.policy,
                "model": ex.model, "worker": ex.worker, "reason": ex.reason, "stream": ex.stream,
                "status": ex.status, "http_status": ex.http_status, "error": ex.error,
                "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens,
                "cost_usd": ex.cost_usd, "latency_ms": round((now - ex.started) * 1000, 3),
                "ttft_ms": None if ex.ttft_s is None else round(ex.ttft_s * 1000, 3),
                "overhead_ms": round(ex.overhead_s(now) * 1000, 3),
                "reference_cost_usd": ex.reference_cost_usd,
                "fallback_from": ex.fallback_from or None,
                "retries": ex.retries or None,
                **_decision_log(ex),
                **_text_log(ex),
            }).decode())

    @staticmethod
    def log_feedback(request_id: str, score: float, policy: str | None) -> None:
        """Write an accepted feedback score to the request log, beside its request's line, so a routing table
        can be built from served traffic (`turnout feedback-table`)."""
        if request_log.isEnabledFor(logging.INFO):
            request_log.info(orjson.dumps({"feedback_for": request_id, "score": score, "policy": policy}).decode())

    def _observe(self, ex: Exchange, now: float) -> None:
        m = self.metrics
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
                if ex.reference_cost_usd is not None:
                    m.reference_cost.labels(model, policy).inc(ex.reference_cost_usd)
                    m.savings.labels(policy).inc(ex.reference_cost_usd - ex.cost_usd)
        m.overhead.observe(ex.overhead_s(now))
        # A client that went away, or a request the worker refused as the client's mistake, says nothing against
        # the worker (its breaker hears "neutral" or "ok" too).
        if ex.status.is_error and ex.worker and not ex.failure_counted:
            m.upstream_errors.labels(ex.worker, ex.status).inc()
        if ex.decision is not None:
            m.decisions.labels(policy, ex.decision.chosen, "affinity" if ex.affinity else "policy").inc()
            if ex.routing_s is not None:
                m.routing.labels(policy).observe(ex.routing_s)
            if ex.embed_s is not None:
                m.embedding.labels("hit" if ex.embed_cached else "miss").observe(ex.embed_s)
            if ex.embed_error is not None:
                m.embedding_failures.labels(policy).inc()
            if ex.score_s is not None:
                m.scoring.labels(policy).observe(ex.score_s)
        if ex.shadow is not None and ex.decision is not None:
            m.shadow_decisions.labels(policy, ex.shadow.policy, ex.decision.chosen, ex.shadow.chosen).inc()
            if ex.shadow.chosen != ex.decision.chosen:
                m.shadow_disagreements.labels(policy, ex.shadow.policy).inc()


def _text_log(ex: Exchange) -> dict[str, Any]:
    """The prompt and the answer, only where the operator asked for them (`server.log_prompts`)."""
    if ex.completion_parts is None:
        return {}
    return {"prompt": ex.prompt_log, "completion": "".join(ex.completion_parts)}


def _decision_log(ex: Exchange) -> dict[str, Any]:
    """The decision's part of the request log line: the ranking, and the shadow's choice next to it."""
    if ex.decision is None:
        return {}
    d = ex.decision
    out: dict[str, Any] = {
        "artifact": d.version, "routing_ms": None if ex.routing_s is None else round(ex.routing_s * 1000, 3),
        "embed_ms": None if ex.embed_s is None else round(ex.embed_s * 1000, 3),
        "score_ms": None if ex.score_s is None else round(ex.score_s * 1000, 3),
        "embed_cached": ex.embed_cached, "embed_error": ex.embed_error, "affinity": ex.affinity,
        "candidates": [{"name": c.name, "score": round(c.score, 6), "quality": c.predicted_quality,
                        "cost_usd": c.predicted_cost_usd} for c in d.ranking],
    }
    if ex.shadow is not None:
        s = ex.shadow
        pick = next((c for c in s.ranking if c.name == s.chosen), None)
        out["shadow"] = {"policy": s.policy, "model": s.chosen, "artifact": s.version,
                         "quality": pick.predicted_quality if pick else None,
                         "cost_usd": pick.predicted_cost_usd if pick else None}
    return out
