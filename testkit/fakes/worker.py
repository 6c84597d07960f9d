"""A fake OpenAI-compatible LLM worker that answers like vLLM, for fast tests, load tests and faults.

Build the app with :func:`create_fake_worker`, or run it as a server::

    python -m testkit.fakes.worker --host 127.0.0.1 --port 8001 --model fake-model \\
        [--ttft-ms X] [--itl-ms Y] [--latency-ms Z] [--max-model-len N] \\
        [--graceful-timeout S] [--timeout-keep-alive S]

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses`` (responses kept in
memory: ``previous_response_id``, ``GET /v1/responses/{id}``, and its ``/cancel``, which answers vLLM's 400 for a
response not in the background), ``POST /v1/messages`` and ``/v1/messages/count_tokens`` (Anthropic's shapes and
events; see :mod:`testkit.fakes.worker_apis`), ``POST /v1/embeddings`` (8-dimensional
vectors from each text's hash; usage as vLLM's pooling server gives it; only the ``status`` fault), ``POST /v1/rerank``
and ``POST /v1/score`` (the cosine of those vectors, vLLM's shapes; ``text_1``/``text_2`` only), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (vLLM-style Prometheus gauges/counters) and the test controls
``GET /fake/stats``, ``POST /fake/reset``, ``GET|POST /fake/mode``.

Faults are injected per request with an extra body field ``"fake": {...}`` or worker-wide with
``POST /fake/mode`` (same keys; the body replaces the current mode, ``{}`` resets it). Keys:
``status`` (int), ``ttft_ms``, ``itl_ms``, ``latency_ms`` (float overrides), ``drop_after`` (int),
``no_usage`` (bool), ``hang`` (bool), ``reply`` (the answer's whole text, str). Request keys override mode
keys, which override the CLI.
``--model "*"`` answers as whatever model a request names (one process standing in for several).
``latency_ms`` only delays non-streaming answers (and injected ``status`` errors); streams get
their headers at once, then ``ttft_ms`` before the first token and ``itl_ms`` between tokens.

``GET /fake/stats``: ``requests`` = ``completed`` (2xx fully sent) + ``errors`` (4xx/5xx sent)
+ ``cancelled`` (client went away first) + ``dropped`` (``drop_after``) + ``active``, plus
``last_body`` and ``bodies`` (the last 50 parsed bodies). ``POST /fake/reset`` zeroes them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from testkit.fakes.worker_protocol import (
    FakeRequestError,
    Faults,
    error_body,
    fake_pooling,
    parse_faults,
    prompt_tokens_of,
)
from testkit.fakes.worker_stream import CompletionsEndpoint, FakeState, FakeWorkerApp, Outcome

__all__ = ["FakeState", "FakeWorkerApp", "create_fake_worker", "main", "render_metrics"]

_KV_BUDGET_SEQUENCES = 4  # the fake KV cache holds max_model_len * 4 tokens


def _json(payload: object, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(state: FakeState) -> str:
    """Prometheus text exposition with the vLLM metrics a router looks at."""
    labels = f'{{model_name="{_label(state.model)}"}}'
    kv_usage = min(1.0, state.active_tokens / float(state.max_model_len * _KV_BUDGET_SEQUENCES))
    lines: list[str] = []
    for name, kind, doc, sample, value in (
        ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", "", state.active),
        ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", "", 0),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", "", kv_usage),
        ("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.", "_total", state.prompt_tokens_total),
        (
            "vllm:generation_tokens",
            "counter",
            "Number of generation tokens processed.",
            "_total",
            state.generation_tokens_total,
        ),
    ):
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name}{sample}{labels} {float(value)!r}"]
    return "\n".join(lines) + "\n"


def create_fake_worker(
    model: str = "fake-model",
    *,
    ttft_ms: float = 0,
    itl_ms: float = 0,
    latency_ms: float = 0,
    max_model_len: int = 2048,
) -> FakeWorkerApp:
    """Build the fake worker app serving ``model``; the timings are defaults that faults can override.

    The app's :class:`FakeState` is available as ``app.state.fake`` for in-process tests.
    """
    state = FakeState(
        model=model,
        max_model_len=max_model_len,
        defaults=Faults(ttft_ms=float(ttft_ms), itl_ms=float(itl_ms), latency_ms=float(latency_ms)),
    )
    started = int(time.time())

    async def models(_: Request) -> Response:
        card = {
            "id": model,
            "object": "model",
            "created": started,
            "owned_by": "fake",
            "root": model,
            "parent": None,
            "max_model_len": max_model_len,
            "permission": [],
        }
        return _json({"object": "list", "data": [card]})

    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def metrics(_: Request) -> Response:
        return Response(render_metrics(state), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def stats(_: Request) -> Response:
        return _json(state.stats())

    async def reset(_: Request) -> Response:
        state.reset()
        return _json(state.stats())

    async def mode(request: Request) -> Response:
        if request.method == "POST":
            raw = await request.body()
            try:
                state.mode = parse_faults(orjson.loads(raw) if raw.strip() else {}, "mode")
            except orjson.JSONDecodeError as exc:
                return Response(
                    FakeRequestError(400, f"malformed JSON body: {exc}").body(), 400, media_type="application/json"
                )
            except FakeRequestError as exc:
                return Response(exc.body(), exc.status, media_type="application/json")
        return _json(state.mode)

    def pooling(kind: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            state.requests += 1
            try:
                body, answer = fake_pooling(kind, await request.body(), state.model, state.base_faults())
            except FakeRequestError as exc:
                state.record(Outcome.ERROR)
                return Response(exc.body(), exc.status, media_type="application/json")
            state.bodies.append(body)
            state.prompt_tokens_total += answer["usage"]["prompt_tokens"]
            state.record(Outcome.COMPLETED)
            return _json(answer)
        return endpoint

    async def count_tokens(request: Request) -> Response:
        state.requests += 1
        try:
            body = orjson.loads(await request.body())
            if not isinstance(body, dict) or (state.model != "*" and body.get("model") != state.model):
                raise FakeRequestError(404, f"The model `{body.get('model') if isinstance(body, dict) else None}` "
                                            "does not exist.", "model")
            tokens = prompt_tokens_of("messages", body)
        except orjson.JSONDecodeError as exc:
            state.record(Outcome.ERROR)
            return Response(FakeRequestError(400, f"malformed JSON body: {exc}").body("messages"), 400,
                            media_type="application/json")
        except FakeRequestError as exc:
            state.record(Outcome.ERROR)
            return Response(exc.body("messages"), exc.status, media_type="application/json")
        state.record(Outcome.COMPLETED)
        return _json({"input_tokens": tokens})

    async def stored_response(request: Request) -> Response:
        response_id = request.path_params["response_id"]
        found = state.responses.get(response_id)
        if found is None:
            return Response(error_body(404, f"Response with id '{response_id}' not found.", "response_id"), 404,
                            media_type="application/json")
        if request.url.path.endswith("/cancel"):  # vLLM's answer for a response that is not in the background
            return Response(error_body(400, "Cannot cancel a synchronous response.", "response_id"), 400,
                            media_type="application/json")
        return _json(found)

    routes = [
        Route("/v1/chat/completions", CompletionsEndpoint(state, "chat"), methods=["POST"]),
        Route("/v1/responses", CompletionsEndpoint(state, "responses"), methods=["POST"]),
        Route("/v1/responses/{response_id}", stored_response, methods=["GET"]),
        Route("/v1/responses/{response_id}/cancel", stored_response, methods=["POST"]),
        Route("/v1/messages", CompletionsEndpoint(state, "messages"), methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/v1/embeddings", pooling("embeddings"), methods=["POST"]),
        Route("/v1/rerank", pooling("rerank"), methods=["POST"]),
        Route("/v1/score", pooling("score"), methods=["POST"]),
        Route("/v1/completions", CompletionsEndpoint(state, "completion"), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/fake/stats", stats, methods=["GET"]),
        Route("/fake/reset", reset, methods=["POST"]),
        Route("/fake/mode", mode, methods=["GET", "POST"]),
    ]
    app = FakeWorkerApp(routes=routes)
    app.state.fake = state
    return app


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: serve the fake worker with uvicorn (uvloop + httptools, quiet logs)."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m testkit.fakes.worker", description="Fake OpenAI-compatible LLM worker (vLLM look-alike)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--itl-ms", type=float, default=0.0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument(
        "--graceful-timeout",
        type=int,
        default=1,
        help="seconds to wait for in-flight (e.g. hanging) requests on shutdown",
    )
    parser.add_argument(
        "--timeout-keep-alive", type=int, default=5, help="idle keep-alive timeout in seconds (5, like vLLM's uvicorn)"
    )
    args = parser.parse_args(argv)
    app = create_fake_worker(
        args.model,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        latency_ms=args.latency_ms,
        max_model_len=args.max_model_len,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=args.graceful_timeout,
        timeout_keep_alive=args.timeout_keep_alive,
    )


if __name__ == "__main__":
    main()
