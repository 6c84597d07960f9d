"""Replay worker: an OpenAI-compatible server that plays one model of a routing table, for the demo.

It answers every prompt with a clearly labelled replay text naming the model and that model's score for
the prompt in the table (``[replay: <model> | table score 1.00 for this prompt]`` plus a short filler),
at a speed that grows with the model's size, so that routing decisions show up in answers, latency and
cost without running any LLM. Start one per model of the table::

    python -m loadtest.replay_worker --table data/llmrouter_9model/data.parquet \\
        --model llama3-chatqa-1.5-70b --port 8101 [--host 127.0.0.1] [--served-name NAME] [--speed 1.0] \\
        [--max-concurrency N] [--size-b 70]

Endpoints, shaped like vLLM's: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming
and not), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` and token counters, by ``model_name``).

Deterministic accounting: prompt_tokens = ceil(UTF-8 bytes of the prompt / 4) (the table's own cost
rule); completion_tokens = min(max_tokens, 64). Latency: ``ttft_ms = 15 + 0.6 * size_b`` and
``0.3 + 0.03 * size_b`` ms per further token, divided by ``--speed`` (see :func:`latency_for`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from routers.offline.dataset import load_table
from routers.offline.prices import BYTES_PER_TOKEN
from server.api.prompts import prompt_text
from testkit.asgi import read_body

__all__ = [
    "ANSWER_TOKENS",
    "Latency",
    "ReplayModel",
    "ReplayRequestError",
    "ReplayState",
    "answer_pieces",
    "build_app",
    "latency_for",
    "load_replay_model",
    "main",
    "parse_size_b",
    "prompt_tokens_of",
]

log = logging.getLogger("turnout.replay_worker")

Kind = Literal["chat", "completion"]

ANSWER_TOKENS = 64  # every answer "generates" this many tokens unless max_tokens is smaller
DEFAULT_SIZE_B = 7.0  # when neither models.json nor the model's name tells the size
FILLER = "This answer was replayed from a routing table by the Turnout demo; no language model ran."

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_SSE_DONE = b"data: [DONE]\n\n"
# "7B", "1.5B", "270M", "8x7B" (a mixture of experts counts all its experts).
_SIZE_RE = re.compile(r"^\s*(?:(\d+)\s*[xX]\s*)?(\d+(?:\.\d+)?)\s*([BbMm])\s*$")
# A size inside a model name: "llama3-chatqa-1.5-70b", "Meta-Llama-3-8B", "mixtral-8x7b".
_NAME_SIZE_RE = re.compile(r"(?:^|[-_/.])(?:(\d+)x)?(\d+(?:\.\d+)?)[bBmM](?=$|[-_/.])")


# Latency model


@dataclass(frozen=True, slots=True)
class Latency:
    """Planned timing of one answer: time to first token and the gap between later tokens (seconds)."""

    ttft_s: float
    itl_s: float

    def total_s(self, completion_tokens: int) -> float:
        """Time from admission to the last token; the first token's time is part of the TTFT."""
        return self.ttft_s + self.itl_s * max(0, completion_tokens - 1)


def latency_for(size_b: float, speed: float = 1.0) -> Latency:
    """The latency of a model of ``size_b`` billion parameters, ``speed`` times faster than real.

    ttft_ms = 15 + 0.6 * size_b and 0.3 + 0.03 * size_b ms per further token: a 64-token answer takes
    about 51 ms for a 7B model and 208 ms for a 70B one, roughly the ratio a real GPU server shows
    (decoding is memory-bound, so time per token grows about linearly with the weights read).
    """
    if not speed > 0 or not math.isfinite(speed):
        raise ValueError(f"speed must be a positive number, got {speed!r}")
    if not size_b >= 0 or not math.isfinite(size_b):
        raise ValueError(f"size_b must be a non-negative number, got {size_b!r}")
    return Latency(ttft_s=(15.0 + 0.6 * size_b) / 1000.0 / speed, itl_s=(0.3 + 0.03 * size_b) / 1000.0 / speed)


def parse_size_b(text: str) -> float | None:
    """Billions of parameters from a size such as "7B", "1.5B", "270M" or "8x7B"; None if it is not one."""
    match = _SIZE_RE.match(text)
    if match is None:
        return None
    return _size_from_parts(match.group(1), match.group(2), match.group(3))


def _size_from_parts(experts: str | None, number: str, unit: str) -> float:
    size = float(number) * (int(experts) if experts else 1)
    return size / 1000.0 if unit in "mM" else size


def _size_from_name(model: str) -> float | None:
    matches = list(_NAME_SIZE_RE.finditer(model))
    if not matches:
        return None
    last = matches[-1]  # "qwen2.5-7b": the version comes first, the size last
    unit = model[last.end() - 1]
    return _size_from_parts(last.group(1), last.group(2), unit)


def _size_from_models_json(path: Path, model: str) -> float | None:
    """``prices_usd_per_1M_tokens[model]["size"]`` of a models.json (the shared/data layout), if any."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    entry = doc.get("prices_usd_per_1M_tokens", {}).get(model) if isinstance(doc, dict) else None
    size = entry.get("size") if isinstance(entry, dict) else None
    return parse_size_b(size) if isinstance(size, str) else None


# The table


@dataclass(frozen=True)
class ReplayModel:
    """One model of a routing table: its score per exact prompt text and its size."""

    model: str
    scores: dict[str, float]  # prompt -> score of the first row with that prompt; NaN = unknown
    size_b: float
    size_source: str  # "models.json", "model name", "default" or "given"

    def score(self, prompt: str) -> float | None:
        """The table score for ``prompt``, NaN when the table does not know it, None when the prompt is absent."""
        return self.scores.get(prompt)


def load_replay_model(table: Path, model: str, size_b: float | None = None) -> ReplayModel:
    """Load ``table`` once with :func:`routers.offline.dataset.load_table` and keep ``model``'s column.

    The size comes from ``size_b`` if given, else from models.json beside the table, else from the
    model's name, else :data:`DEFAULT_SIZE_B`. ValueError (a ``TableError`` for a bad table) when the
    table cannot be used or has no such model.
    """
    data = load_table(table)
    if model not in data.models:
        raise ValueError(f"model {model!r} is not in {table.name}; its models are: {', '.join(data.models)}")
    column = data.scores[:, data.models.index(model)]
    scores: dict[str, float] = {}
    for prompt, score in zip(data.prompts, column.tolist(), strict=True):
        scores.setdefault(prompt, float(score))  # a repeated prompt (train and test) keeps its first row
    if size_b is not None:
        return ReplayModel(model, scores, float(size_b), "given")
    for source, found in (
        ("models.json", _size_from_models_json(table.parent / "models.json", model)),
        ("model name", _size_from_name(model)),
    ):
        if found is not None:
            return ReplayModel(model, scores, found, source)
    return ReplayModel(model, scores, DEFAULT_SIZE_B, "default")


# Requests and answers


class ReplayRequestError(Exception):
    """A request the replay worker rejects, with its status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        """Describe the error; ``code`` follows the gateway's codes (``invalid_request``, ``model_not_found``)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> bytes:
        """``{"error": {"message", "type", "param", "code"}}``."""
        etype = "invalid_request_error" if self.status < 500 else "server_error"
        return orjson.dumps({"error": {"message": self.message, "type": etype, "param": self.param, "code": self.code}})


def prompt_tokens_of(prompt: str) -> int:
    """ceil(UTF-8 bytes / 4): the rule the routing tables use to estimate costs."""
    return math.ceil(len(prompt.encode("utf-8")) / BYTES_PER_TOKEN)


def answer_pieces(model: str, score: float | None) -> list[str]:
    """The replay answer as stream pieces: the label first (always whole), then the filler word by word."""
    if score is None:
        label = f"[replay: {model} | prompt not in the table, score unknown]"
    elif math.isnan(score):
        label = f"[replay: {model} | table score unknown for this prompt]"
    else:
        label = f"[replay: {model} | table score {score:.2f} for this prompt]"
    return [label, *(f" {word}" for word in FILLER.split())]


@dataclass(frozen=True, slots=True)
class Job:
    """A validated completion request and the answer to give."""

    kind: Kind
    prompt_tokens: int
    completion_tokens: int
    pieces: tuple[str, ...]
    finish_reason: str
    stream: bool
    include_usage: bool

    def usage(self) -> dict[str, int]:
        """The OpenAI ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ReplayRequestError(400, f"'{name}' must be a positive integer.", name)
    return value


def _check_prompt(kind: Kind, body: dict[str, Any]) -> None:
    """Reject what :func:`prompt_text` would silently read as an empty prompt."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ReplayRequestError(400, "'messages' must be a non-empty list of messages.", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ReplayRequestError(400, f"messages[{i}] must be an object with a string 'role'.", "messages")
            if not isinstance(message.get("content"), str | list | None):
                raise ReplayRequestError(400, f"messages[{i}].content must be a string or a list of parts.", "messages")
        return
    prompt = body.get("prompt")
    # One prompt per request: a list of several would need one choice each, which the demo never sends.
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str))):
        raise ReplayRequestError(400, "'prompt' must be a string (or a list of exactly one string).", "prompt")


def parse_job(kind: Kind, raw: bytes, replay: ReplayModel, served_name: str) -> Job:
    """Validate a request body and decide the answer; :class:`ReplayRequestError` when it is not usable."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ReplayRequestError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ReplayRequestError(400, f"The request body must be a JSON object, got {type(body).__name__}.")
    model = body.get("model")
    if model is not None and model != served_name:  # like vLLM: a misrouted request is an error, not an answer
        raise ReplayRequestError(404, f"The model '{model}' does not exist.", "model", "model_not_found")
    _check_prompt(kind, body)
    if body.get("n") not in (None, 1):
        raise ReplayRequestError(400, "The replay worker gives one choice per request: 'n' must be 1.", "n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ReplayRequestError(400, "'stream' must be a boolean.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ReplayRequestError(400, "'stream_options' must be an object.", "stream_options")
    limit = _positive_int(body, "max_tokens")
    if kind == "chat":  # OpenAI's newer name wins when both are given, as in vLLM
        limit = _positive_int(body, "max_completion_tokens") or limit
    prompt = prompt_text(body)
    completion_tokens = ANSWER_TOKENS if limit is None else min(limit, ANSWER_TOKENS)
    # Each piece stands for at least one token, so a tiny max_tokens shortens the filler (never the label).
    pieces = answer_pieces(replay.model, replay.score(prompt))[: max(1, completion_tokens)]
    return Job(
        kind=kind,
        prompt_tokens=prompt_tokens_of(prompt),
        completion_tokens=completion_tokens,
        pieces=tuple(pieces),
        finish_reason="length" if completion_tokens < ANSWER_TOKENS else "stop",
        stream=stream is True,
        include_usage=stream is True and options is not None and options.get("include_usage") is True,
    )


def _sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class _Frames:
    """Builds the JSON answer or the SSE chunks of one job, shaped like vLLM's."""

    def __init__(self, job: Job, served_name: str) -> None:
        self.job = job
        self.common: dict[str, Any] = {
            "id": ("chatcmpl-" if job.kind == "chat" else "cmpl-") + secrets.token_hex(16),
            "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": served_name,
        }

    def full(self) -> bytes:
        job = self.job
        text = "".join(job.pieces)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": job.finish_reason}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = "chat.completion" if job.kind == "chat" else "text_completion"
        return orjson.dumps({**self.common, "object": obj, "choices": [choice], "usage": job.usage()})

    def _chunk(self, fields: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({**self.common, "choices": [{"index": 0, **fields, "logprobs": None, "finish_reason": finish}]})

    def piece(self, i: int) -> bytes:
        text = self.job.pieces[i]
        if self.job.kind == "completion":
            return self._chunk({"text": text})
        content = self._chunk({"delta": {"content": text}})
        if i == 0:  # vLLM opens a chat stream with the role
            return self._chunk({"delta": {"role": "assistant", "content": ""}}) + content
        return content

    def tail(self) -> bytes:
        job = self.job
        fields: dict[str, Any] = {"delta": {}} if job.kind == "chat" else {"text": ""}
        out = self._chunk(fields, job.finish_reason)
        if job.include_usage:
            out += _sse({**self.common, "choices": [], "usage": job.usage()})
        return out + _SSE_DONE


# Server state and metrics


class ReplayState:
    """What one replay worker knows: its model, timing, admission control and counters."""

    def __init__(
        self, replay: ReplayModel, served_name: str, latency: Latency, max_concurrency: int | None = None
    ) -> None:
        """``max_concurrency`` (None = unlimited) requests run at once; later ones wait, counted as waiting."""
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.replay = replay
        self.served_name = served_name
        self.latency = latency
        self.max_concurrency = max_concurrency
        self.running = 0
        self.waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        # Created lazily: a Semaphore made outside a running loop is fine on 3.11, but the app may be
        # built in one loop (a test) and served in another; one per app is all that is needed.
        self._slots: asyncio.Semaphore | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StateCollector(self))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the duration of an answer (waiting for it first when all are taken)."""
        if self.max_concurrency is None:
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()

    def kv_cache_usage(self) -> float:
        """Running requests over the concurrency limit (a stand-in for vLLM's KV-cache use); 0 without a limit."""
        return 0.0 if self.max_concurrency is None else self.running / self.max_concurrency


class _StateCollector(Collector):
    """Reads the state at scrape time; counters without the ``_created`` series vLLM does not export."""

    def __init__(self, state: ReplayState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        labels, values = ["model_name"], [state.served_name]
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", state.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", state.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", state.kv_cache_usage()),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(values, float(value))
            yield gauge
        for name, doc, total in (
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", state.prompt_tokens_total),
            ("vllm:generation_tokens", "Number of generation tokens processed.", state.generation_tokens_total),
        ):
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric(values, float(total))
            yield counter


# ASGI


async def _sleep_until(deadline: float) -> None:
    """Sleep to an absolute loop time, so that the overshoot of one sleep does not add up over a stream."""
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _send_bytes(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    all_headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _CompletionsEndpoint:
    """Raw ASGI endpoint (chat or text completions): it paces every chunk and stops when the client leaves."""

    def __init__(self, state: ReplayState, kind: Kind) -> None:
        self.state = state
        self.kind: Kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        if raw is None:
            return
        try:
            job = parse_job(self.kind, raw, self.state.replay, self.state.served_name)
        except ReplayRequestError as exc:
            await _send_bytes(send, exc.status, _JSON_HEADERS, exc.body())
            return
        # uvicorn drops what is sent after a disconnect without telling; watching receive() is the way to
        # stop pacing an answer nobody reads (and to free its slot).
        producer = asyncio.ensure_future(self._answer(job, send))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((producer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also on cancellation (server shutdown, an in-process client giving up): free the slot now.
            for task in (producer, watcher):
                if not task.done():
                    task.cancel()
            await asyncio.gather(producer, watcher, return_exceptions=True)
        if producer.done() and not producer.cancelled():
            producer.result()  # re-raise a bug for the server to log

    async def _answer(self, job: Job, send: Send) -> None:
        state = self.state
        async with state.slot():
            state.prompt_tokens_total += job.prompt_tokens
            start = asyncio.get_running_loop().time()
            latency = state.latency
            frames = _Frames(job, state.served_name)
            if not job.stream:
                await _sleep_until(start + latency.total_s(job.completion_tokens))
                await _send_bytes(send, 200, _JSON_HEADERS, frames.full())
                state.generation_tokens_total += job.completion_tokens
                return
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            n = len(job.pieces)
            decode_s = latency.total_s(job.completion_tokens) - latency.ttft_s
            step = decode_s / max(1, n - 1)  # the tokens after the first, spread over the remaining pieces
            for i in range(n):
                await _sleep_until(start + latency.ttft_s + i * step)
                await send({"type": "http.response.body", "body": frames.piece(i), "more_body": True})
            await _sleep_until(start + latency.total_s(job.completion_tokens))
            await send({"type": "http.response.body", "body": frames.tail(), "more_body": False})
            state.generation_tokens_total += job.completion_tokens


def build_app(
    table: Path,
    model: str,
    served_name: str | None = None,
    speed: float = 1.0,
    *,
    max_concurrency: int | None = None,
    size_b: float | None = None,
) -> Starlette:
    """The replay worker for ``model`` of the routing table at ``table``, answering as ``served_name``.

    ``speed`` divides every delay; ``max_concurrency`` bounds running requests (the rest wait);
    ``size_b`` overrides the model size used for latency. The :class:`ReplayState` is ``app.state.replay``.
    ValueError when the table cannot be used, has no such model, or an option is out of range.
    """
    replay = load_replay_model(table, model, size_b)
    name = served_name or model
    state = ReplayState(replay, name, latency_for(replay.size_b, speed), max_concurrency)
    started = int(time.time())

    async def models(_: Request) -> Response:
        card = {"id": name, "object": "model", "created": started, "owned_by": "turnout-replay", "root": model,
                "parent": None, "permission": []}
        return Response(orjson.dumps({"object": "list", "data": [card]}), media_type="application/json")

    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", _CompletionsEndpoint(state, "chat"), methods=["POST"]),
            Route("/v1/completions", _CompletionsEndpoint(state, "completion"), methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )
    app.state.replay = state
    return app


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: load the table, then serve the replay worker with uvicorn (quiet logs)."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m loadtest.replay_worker",
        description="OpenAI-compatible worker that replays one model of a routing table (labelled answers, "
        "latency by model size).",
    )
    parser.add_argument("--table", type=Path, required=True, help="routing table (.parquet, .jsonl or .csv)")
    parser.add_argument("--model", required=True, help="the table's model to play (a score__<model> column)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-name", default=None, help="model name in the API (default: --model)")
    parser.add_argument("--speed", type=_positive_float, default=1.0, help="divides every delay (2 = twice as fast)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="running requests at most; others wait")
    parser.add_argument("--size-b", type=float, default=None, help="model size in billions (default: models.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        app = build_app(
            args.table, args.model, args.served_name, args.speed, max_concurrency=args.max_concurrency,
            size_b=args.size_b,
        )
    except ValueError as exc:  # TableError included
        parser.error(str(exc))
    state: ReplayState = app.state.replay
    log.info(
        "replaying %s as %s on %s:%d: %d prompts, %.3gB parameters (%s), ttft %.1f ms, %.2f ms/token",
        args.model, state.served_name, args.host, args.port, len(state.replay.scores), state.replay.size_b,
        state.replay.size_source, state.latency.ttft_s * 1000, state.latency.itl_s * 1000,
    )
    uvicorn.run(app, host=args.host, port=args.port, lifespan="off", access_log=False, log_level="warning",
                timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
