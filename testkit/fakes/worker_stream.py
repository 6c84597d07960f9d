"""ASGI side of the fake vLLM worker: shared state and the completion endpoints.

The completion endpoints are raw ASGI callables (not ``request -> Response`` functions) so they
control exactly when bytes go out, can close the socket abruptly (``drop_after``) and can tell a
client that went away (``cancelled``) from one that got its full answer (``completed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send

from testkit.asgi import read_body
from testkit.fakes.worker_apis import response_object
from testkit.fakes.worker_protocol import (
    CompletionJob,
    FakeRequestError,
    Faults,
    Kind,
    answer_text,
    error_body,
    full_response,
    parse_job,
    stream_frames,
)

TRANSPORT_SCOPE_KEY = "turnout.fake.transport"
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_DROP_DISCONNECT_WAIT_S = 5.0


class Outcome(enum.Enum):
    """How a completion request ended."""

    COMPLETED = "completed"
    ERROR = "errors"
    CANCELLED = "cancelled"
    DROPPED = "dropped"


class ConnectionDropped(Exception):
    """Raised to abort a response when the raw transport is not reachable (e.g. in-process ASGI)."""


@dataclass
class FakeState:
    """Mutable state of one fake worker: configuration, fault mode, stats and metric counters."""

    model: str
    max_model_len: int
    defaults: Faults
    mode: dict[str, Any] = field(default_factory=dict)
    requests: int = 0
    completed: int = 0
    errors: int = 0
    cancelled: int = 0
    dropped: int = 0
    active: int = 0
    active_tokens: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    bodies: deque[Any] = field(default_factory=lambda: deque(maxlen=50))
    # The W3C `traceparent` header of the last requests (None when a request had none).
    traceparents: deque[str | None] = field(default_factory=lambda: deque(maxlen=50))
    # The Responses API's stored responses (as vLLM with VLLM_ENABLE_RESPONSES_API_STORE=1 keeps them).
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)

    def base_faults(self) -> Faults:
        """Worker defaults with the current ``/fake/mode`` applied."""
        return self.defaults.merged(self.mode)

    def reset(self) -> None:
        """Zero the stats and counters (``active`` reflects live requests and is kept)."""
        self.requests = self.completed = self.errors = self.cancelled = self.dropped = 0
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self.bodies.clear()
        self.traceparents.clear()

    def stats(self) -> dict[str, Any]:
        """The ``GET /fake/stats`` document."""
        return {
            "requests": self.requests,
            "completed": self.completed,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "dropped": self.dropped,
            "active": self.active,
            "last_body": self.bodies[-1] if self.bodies else None,
            "bodies": list(self.bodies),
            "traceparents": list(self.traceparents),
        }

    def record(self, outcome: Outcome) -> None:
        """Count a finished request."""
        setattr(self, outcome.value, getattr(self, outcome.value) + 1)


class FakeWorkerApp(Starlette):
    """Starlette app that also exposes uvicorn's transport to the endpoints (to drop connections)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Stash the server transport (uvicorn's ``send`` is a bound method of its request cycle)."""
        if scope["type"] == "http":
            scope[TRANSPORT_SCOPE_KEY] = getattr(getattr(send, "__self__", None), "transport", None)
        await super().__call__(scope, receive, send)


async def _send_bytes(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    all_headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000.0)


def _drop(scope: Scope) -> Outcome:
    """Close the socket without finishing the response (client sees an incomplete/absent answer)."""
    transport = scope.get(TRANSPORT_SCOPE_KEY)
    if transport is None:
        raise ConnectionDropped("fake worker dropped the connection")
    transport.close()
    return Outcome.DROPPED


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


class CompletionsEndpoint:
    """ASGI endpoint for ``POST /v1/chat/completions`` (kind "chat") or ``/v1/completions``."""

    def __init__(self, state: FakeState, kind: Kind) -> None:
        """Bind the endpoint to the worker state."""
        self.state = state
        self.kind: Kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one request, counting it in the stats whatever happens."""
        state = self.state
        state.requests += 1
        state.active += 1
        outcome = Outcome.CANCELLED
        tokens = 0
        job: CompletionJob | None = None
        try:
            raw = await read_body(receive)
            if raw is None:
                return
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise FakeRequestError(400, f"malformed JSON body: {exc}") from exc
            state.bodies.append(body)
            parent = dict(scope["headers"]).get(b"traceparent")
            state.traceparents.append(parent.decode() if parent is not None else None)
            job = parse_job(self.kind, body, state.model, state.max_model_len, state.base_faults(), state.responses)
            state.prompt_tokens_total += job.prompt_tokens
            tokens = job.prompt_tokens + job.completion_tokens
            state.active_tokens += tokens
            if self.kind == "responses" and body.get("store") is not False:
                # Kept before it is sent, so a follow-up right after finds it; forgotten if it is not completed.
                state.responses[job.answer_id] = response_object(job, answer_text(job))
            outcome = await self._answer(job, scope, receive, send)
        except FakeRequestError as exc:
            await _send_bytes(send, exc.status, _JSON_HEADERS, exc.body(self.kind))
            outcome = Outcome.ERROR
        except ConnectionDropped:
            outcome = Outcome.DROPPED
            raise
        except Exception:
            outcome = Outcome.ERROR
            raise
        finally:
            state.active -= 1
            state.active_tokens -= tokens
            state.record(outcome)
            if job is not None and outcome is not Outcome.COMPLETED:
                state.responses.pop(job.answer_id, None)

    async def _answer(self, job: CompletionJob, scope: Scope, receive: Receive, send: Send) -> Outcome:
        faults = job.faults
        if not (faults.hang or job.stream) and faults.status is None and faults.drop_after is None:
            delay = faults.latency_ms + faults.ttft_ms + faults.itl_ms * job.completion_tokens
            if delay <= 0:  # fast path: nothing to wait for, nothing to race
                await _send_bytes(send, 200, _JSON_HEADERS, full_response(job))
                self.state.generation_tokens_total += job.completion_tokens
                return Outcome.COMPLETED
        return await self._race(self._produce(job, scope, send), receive)

    async def _race(self, produce: Coroutine[Any, Any, Outcome], receive: Receive) -> Outcome:
        """Run the producer while watching for the client going away; whichever ends first wins."""
        producer: asyncio.Task[Outcome] = asyncio.ensure_future(produce)
        waiter = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((producer, waiter), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # server shutting down
            producer.cancel()
            waiter.cancel()
            raise
        if producer.done():
            try:
                outcome = producer.result()
                if outcome is Outcome.DROPPED:  # let uvicorn see the connection loss before returning
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(waiter, _DROP_DISCONNECT_WAIT_S)
            finally:
                waiter.cancel()
            return outcome
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        waiter.result()  # re-raise if receive() itself failed
        return Outcome.CANCELLED

    async def _produce(self, job: CompletionJob, scope: Scope, send: Send) -> Outcome:
        faults = job.faults
        if faults.hang:
            await asyncio.get_running_loop().create_future()  # until cancelled by a disconnect
        if faults.status is not None:
            await _sleep_ms(faults.latency_ms)
            message = f"Fake worker injected HTTP {faults.status}"
            await _send_bytes(send, faults.status, _JSON_HEADERS, error_body(faults.status, message, None, job.kind))
            return Outcome.COMPLETED if faults.status < 400 else Outcome.ERROR
        if job.stream:
            return await self._stream(job, scope, send)
        await _sleep_ms(faults.latency_ms + faults.ttft_ms + faults.itl_ms * job.completion_tokens)
        if faults.drop_after is not None:
            return _drop(scope)
        await _send_bytes(send, 200, _JSON_HEADERS, full_response(job))
        self.state.generation_tokens_total += job.completion_tokens
        return Outcome.COMPLETED

    async def _stream(self, job: CompletionJob, scope: Scope, send: Send) -> Outcome:
        faults = job.faults
        frames = stream_frames(job)
        n = job.completion_tokens if faults.drop_after is None else min(faults.drop_after, job.completion_tokens)
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        await _sleep_ms(faults.ttft_ms)
        state = self.state
        if faults.itl_ms <= 0:
            state.generation_tokens_total += n
            body = frames.head + frames.first(n) if n else b""
            await send({"type": "http.response.body", "body": body, "more_body": True})
        else:
            delay = faults.itl_ms / 1000.0
            for i in range(n):
                if i:
                    await asyncio.sleep(delay)
                state.generation_tokens_total += 1
                chunk = frames.head + frames.at(0) if i == 0 else frames.at(i)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if faults.drop_after is not None:
            return _drop(scope)
        await send({"type": "http.response.body", "body": frames.tail, "more_body": False})
        return Outcome.COMPLETED
