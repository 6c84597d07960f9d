"""`Exchange`: the record of one request, written by every stage that serves it and read when it ends
(`server.telemetry.recorder`), and the `x-turnout-*` headers it gives the response."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from routers.base import RoutingDecision
from server.config import Price
from server.outcome import Outcome


def header_text(text: str, limit: int = 200) -> str:
    """`text` made safe for an HTTP header value: ASCII, one line, at most `limit` characters."""
    flat = " ".join(text.split()).encode("ascii", "replace").decode("ascii")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def usage_tokens(usage: dict[str, Any]) -> tuple[Any, Any]:
    """(prompt tokens, answer tokens) of a usage object of any of the relayed APIs. An embedding's usage has no
    answer tokens (0). Anthropic's `input_tokens` leaves out the tokens read from or written to the prompt cache
    (vLLM reports cache hits there), which were prompt tokens all the same: they are added back, so a Messages
    request counts its prompt as the same request on chat would."""
    if "input_tokens" in usage or "output_tokens" in usage:
        pt = usage.get("input_tokens")
        if isinstance(pt, int):
            for cached in ("cache_read_input_tokens", "cache_creation_input_tokens"):
                extra = usage.get(cached)
                pt += extra if isinstance(extra, int) else 0
        return pt, usage.get("output_tokens")
    pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if ct is None and isinstance(pt, int) and usage.get("total_tokens") == pt:
        ct = 0  # an embedding's usage: input tokens only
    return pt, ct


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
    status: Outcome = Outcome.OK
    http_status: int = 200
    error: str | None = None
    decision: RoutingDecision | None = None
    shadow: RoutingDecision | None = None
    routing_s: float | None = None
    embed_s: float | None = None
    score_s: float | None = None
    embed_cached: bool | None = None
    embed_error: str | None = None  # the prompt could not be embedded: the policy's fallback was sent
    affinity: bool = False
    key: str | None = None  # the client key's name (never the key)
    response_id: str | None = None  # a Responses API answer's id (its worker keeps it)
    requested_model: str | None = None  # the body's `model`: a model, a worker, `auto` or a policy
    # Models that failed before their first byte, in order, before the one that answered (fallbacks).
    fallback_from: list[str] = field(default_factory=list)
    retries: int = 0  # re-sends to the same model after a failure before the first byte
    # The current worker's failure is already in `turnout_upstream_errors` (counted where it happened, before
    # a retry or fallback), so the end of the request must not count it again.
    failure_counted: bool = False
    # Savings are counted against this price (the live config's reference model when the request started).
    reference_price: Price | None = None
    reference_cost_usd: float | None = None
    # Only when the operator turned on `server.log_prompts`: the request's messages (or prompt) and the answer.
    prompt_log: Any = None
    completion_parts: list[str] | None = None

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
        """The `x-turnout-*` response headers known so far: where the request went and, when a policy
        chose, a summary of its decision (the full one is `POST /v1/route`)."""
        out = {
            "x-turnout-request-id": self.request_id,
            "x-turnout-model": self.worker or "",
            "x-turnout-policy": self.policy or "",
            "x-turnout-overhead-ms": f"{self.overhead_s() * 1000:.3f}",
        }
        d = self.decision
        if d is not None:
            out["x-turnout-artifact"] = d.version
            out["x-turnout-reason"] = header_text(d.reason)
            chosen = next((c for c in d.ranking if c.name == d.chosen), None)
            if chosen is not None and chosen.predicted_quality is not None:
                out["x-turnout-predicted-quality"] = f"{chosen.predicted_quality:.4f}"
            if chosen is not None and chosen.predicted_cost_usd is not None:
                out["x-turnout-predicted-cost-usd"] = f"{chosen.predicted_cost_usd:.6g}"
            if self.routing_s is not None:
                out["x-turnout-routing-ms"] = f"{self.routing_s * 1000:.3f}"
            if self.affinity:
                out["x-turnout-affinity"] = "1"
        if self.shadow is not None:
            out["x-turnout-shadow-model"] = self.shadow.chosen
        if self.fallback_from:
            out["x-turnout-fallback-from"] = ",".join(self.fallback_from)
        if self.retries:
            out["x-turnout-retries"] = str(self.retries)
        return out

    def set_usage(self, usage: Any, price: Price | None) -> None:
        """Take token counts from a `usage` object (OpenAI's `prompt_tokens`/`completion_tokens`, or the
        `input_tokens`/`output_tokens` of the Responses and Messages APIs) and price them."""
        if not isinstance(usage, dict):
            return
        pt, ct = usage_tokens(usage)
        if isinstance(pt, int) and isinstance(ct, int):
            self.prompt_tokens, self.completion_tokens = pt, ct
            if price is not None:
                self.cost_usd = price.cost_usd(pt, ct)
            if self.reference_price is not None:
                self.reference_cost_usd = self.reference_price.cost_usd(pt, ct)
