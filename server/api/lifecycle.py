"""`RequestLife`: one request from its admission to its end, whether it streamed or not.

Everything a request takes as it goes (an in-flight count, a budget hold, a policy's decision, a stream and its
worker lease) is noted here, and given back in one place, `end`, in one documented order:

1. close the worker's stream, if one is open (a stream that did not complete becomes a client disconnect);
2. record the outcome: metrics and the status page;
3. write the request's log line;
4. tell the policy how its choice went (and give a learning policy's feedback record its cost), and end the
   request's trace span;
5. settle the budget hold, and end the stream's worker lease with the relay's verdict;
6. decrement the in-flight gauge.

`end` runs when the response is about to send its last bytes (`server.api.responses`), so a client holding
the whole answer finds it counted; it is idempotent, and also runs if the response is never sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Span
from prometheus_client import Gauge
from starlette.responses import Response

from routers.base import Router, RoutingDecision, RoutingOutcome
from server.api.responses import EndingResponse, RelayResponse
from server.outcome import Outcome
from server.policy.feedback import FeedbackBook, FeedbackRecord
from server.policy.selection import Selection
from server.quota.admission import settle
from server.quota.limits import Admission, Limits
from server.telemetry.record import Exchange
from server.telemetry.recorder import Recorder
from server.telemetry.tracing import end_request
from server.upstream.forward import Answer, Streaming

log = logging.getLogger("turnout.lifecycle")
Spawn = Callable[[Coroutine[Any, Any, None]], None]


@dataclass(frozen=True, slots=True)
class LifeParts:
    """The gateway's parts a request's end reports to (built once by the gateway)."""

    recorder: Recorder
    in_flight: Gauge
    feedback: FeedbackBook
    limits: Limits
    spawn: Spawn  # runs store writes off the request's path


@dataclass(slots=True)
class _Told:
    """The policy that chose, what it chose, and the request's feedback record."""

    router: Router
    decision: RoutingDecision
    record: FeedbackRecord


class RequestLife:
    """Owns one request from admission to its end (see the module docstring for the end order)."""

    def __init__(self, ex: Exchange, parts: LifeParts) -> None:
        self.ex, self._parts = ex, parts
        self._hold: Admission | None = None
        self._told: _Told | None = None
        self._stream: Streaming | None = None
        self.span: Span | None = None  # the request's trace span, when tracing is on
        self._ended = False
        parts.in_flight.inc()

    def hold(self, adm: Admission) -> None:
        """The request holds `adm` against its key's budget and limits until it ends."""
        self._hold = adm

    @property
    def admission(self) -> Admission | None:
        """The key's admission this request holds (None: no key, or auth is off)."""
        return self._hold

    def routed(self, sel: Selection) -> None:
        """Note the routing decision on the exchange, write the policy's feedback record (off the path: it is
        written while the worker answers, long before a client can score the answer) and tell the policy the
        outcome at the end."""
        ex = self.ex
        ex.policy, ex.decision, ex.shadow = sel.policy, sel.decision, sel.shadow
        ex.routing_s = sel.routing_s if sel.policy else None
        ex.embed_cached, ex.affinity, ex.embed_s, ex.score_s = sel.embed_cached, sel.affinity, sel.embed_s, sel.score_s
        ex.embed_error = sel.embed_error
        ex.reason = sel.decision.reason if sel.decision else None
        if sel.router is None or sel.decision is None:
            return
        d = sel.decision
        record = self._parts.feedback.make_record(ex.request_id, sel.router, d.policy, d.version, d.chosen, ex.key)
        self._parts.spawn(self._parts.feedback.put(ex.request_id, record))
        self._told = _Told(sel.router, d, record)

    def respond(self, result: Answer | Streaming) -> Response:
        """The response carrying the worker's answer; it ends this request as its last bytes go out."""
        if isinstance(result, Streaming):
            self._stream = result
            self.ex.freeze_stream_overhead()
            return RelayResponse(result.relay, self.end, headers=self.ex.headers(), deadline=result.relay.deadline,
                                 on_cut=result.relay.cut_off)
        return EndingResponse(result.content, result.status, self.ex.headers(), self.end)

    def respond_empty(self, status: int) -> Response:
        """A response with no body (499: nobody is listening any more); it ends this request."""
        return EndingResponse(b"", status, self.ex.headers(), self.end, media_type=None)

    def respond_error(self, response: Response) -> Response:
        """An error response (already rendered); it ends this request."""
        return EndingResponse(bytes(response.body), response.status_code, dict(response.headers), self.end)

    async def end(self) -> None:
        """End the request: every step in the documented order, exactly once."""
        if self._ended:
            return
        self._ended = True
        ex = self.ex
        try:
            if self._stream is not None:
                await self._stream.relay.aclose()
        finally:
            now = time.perf_counter()
            try:
                self._parts.recorder.record(ex, now)
                self._parts.recorder.log_line(ex, now)
                self._tell_policy(now)
                if self.span is not None:
                    end_request(self.span, ex)
            finally:  # whatever reporting did, what the request holds is given back
                if self._hold is not None:
                    self._parts.spawn(settle(self._parts.limits, self._hold, ex))
                if self._stream is not None:
                    self._stream.lease.end(self._stream.relay.verdict)
                self._parts.in_flight.dec()

    def _tell_policy(self, now: float) -> None:
        told, ex = self._told, self.ex
        if told is None:
            return
        try:
            if ex.cost_usd is not None and told.record.features is not None:  # a bandit's reward uses the cost
                told.record.cost_usd = ex.cost_usd
                self._parts.spawn(self._parts.feedback.put(ex.request_id, told.record))
            # The chosen model failed when the request had to fall back, whatever the fallback did.
            ok = ex.status is Outcome.OK and not ex.fallback_from
            told.router.observe(RoutingOutcome(request_id=ex.request_id, chosen=told.decision.chosen, ok=ok,
                                               cost_usd=ex.cost_usd, latency_s=now - ex.started))
        except Exception:  # a policy's bookkeeping must never break the request's accounting
            log.exception("policy %s failed to take the outcome of request %s", told.decision.policy,
                          ex.request_id)
