"""`FleetCaller`: one chat completion at a time to a named model of the config, through the gateway's own worker
registry, pooled client, forwarder, timeouts, retries, breakers and concurrency limits (not a second HTTP stack).

Each call streams, so its time to first token is measured the way the gateway measures it; the answer's text,
finish reason and token logprobs are read from the stream's events, and its tokens and cost from the usage the
worker reports, priced as the config prices that worker.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.config import TurnoutConfig
from server.errors import GatewayError
from server.fleet.run import Answer
from server.outcome import Outcome
from server.telemetry.metrics import Metrics
from server.telemetry.record import Exchange
from server.upstream.client import UpstreamClient
from server.upstream.forward import Call, Forwarder, Streaming
from server.upstream.sse import DONE, EventSplitter, event_data
from server.upstream.workers import WorkerRegistry


@dataclass(slots=True)
class _Reading:
    """What the stream's events said so far."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    def take(self, data: bytes) -> None:
        """Take one event's choice deltas: text, logprobs, finish reason."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        for choice in obj.get("choices") or [] if isinstance(obj, dict) else []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.parts.append(delta["content"])
            content = (choice.get("logprobs") or {}).get("content") or []
            self.logprobs.extend(float(t["logprob"]) for t in content
                                 if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)
                                 and math.isfinite(t["logprob"]))
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])


class FleetCaller:
    """Sends chat completions to the config's models (see the module docstring)."""

    def __init__(self, config: TurnoutConfig, client: UpstreamClient | None = None) -> None:
        self.registry = WorkerRegistry(config)
        self._own_client = client is None
        self.client = client or UpstreamClient(config.upstream)
        self.forwarder = Forwarder(self.client, Metrics(enabled=False))
        self._no_logprobs: set[str] = set()  # models whose workers refused a request for logprobs

    def targets(self) -> list[str]:
        """Every model and worker name a call may name."""
        return [*self.registry.models(), *self.registry.workers]

    async def chat(self, prompt_id: str, model: str, messages: Sequence[dict[str, Any]], *, max_tokens: int,
                   logprobs: bool = True, sampling: dict[str, Any] | None = None) -> Answer:
        """One answer of `model` to `messages` (never raises for a failed call: the answer carries the error).
        Asks for token logprobs unless the model's worker has refused them once."""
        body: dict[str, Any] = {"messages": list(messages), "max_tokens": max_tokens, "stream": True,
                                "stream_options": {"include_usage": True}, **(sampling or {})}
        if logprobs and model not in self._no_logprobs:
            body["logprobs"] = True
        answer = await self._send(prompt_id, model, body)
        if answer.error is not None and answer.error.startswith("worker answered 400") and "logprobs" in body:
            # A worker that serves no logprobs refuses the request: ask again without them, and remember when
            # that worked (a 400 for another reason, a prompt too long, says nothing about logprobs).
            del body["logprobs"]
            answer = await self._send(prompt_id, model, body)
            if answer.ok:
                self._no_logprobs.add(model)
        return answer

    async def _send(self, prompt_id: str, model: str, body: dict[str, Any]) -> Answer:
        ex = Exchange(request_id=uuid.uuid4().hex, endpoint="chat", stream=True)
        started = time.perf_counter()
        try:
            result = await self.forwarder.send(self.registry, Call([model], "/chat/completions", dict(body),
                                                                   wants_usage=True), ex)
        except GatewayError as err:
            return Answer(prompt_id, model, worker=ex.worker, error=err.log_message(),
                          latency_s=time.perf_counter() - started)
        assert isinstance(result, Streaming)  # every call streams
        reading = await _read(result)
        answer = Answer(prompt_id, model, worker=ex.worker, latency_s=time.perf_counter() - started,
                        ttft_s=ex.ttft_s, prompt_tokens=ex.prompt_tokens, completion_tokens=ex.completion_tokens,
                        cost_usd=ex.cost_usd, finish_reason=reading.finish_reason)
        answer.unmetered = ex.cost_usd is None
        if ex.status is not Outcome.OK:
            answer.error = ex.error or str(ex.status)
        elif ex.cost_usd is None:
            answer.error = "the worker reported no usage"  # unpriced: no cost to route by
        else:
            answer.text = "".join(reading.parts)
            if reading.logprobs:
                answer.logprob_mean = sum(reading.logprobs) / len(reading.logprobs)
                answer.logprob_min = min(reading.logprobs)
        return answer

    async def aclose(self) -> None:
        """Close the pooled client (when this caller made it)."""
        if self._own_client:
            await self.client.aclose()


async def _read(result: Streaming) -> _Reading:
    """Relay the whole stream into a `_Reading`; then end it and give the worker lease back."""
    reading = _Reading()
    splitter = EventSplitter()
    try:
        async for chunk in result.relay:
            for event in splitter.feed(chunk):
                data = event_data(event)
                if data is not None and data != DONE:
                    reading.take(data)
    finally:
        await result.relay.aclose()
        result.lease.end(result.relay.verdict)
    return reading
