"""OpenTelemetry traces: one span per relayed request, with children for the prompt's embedding, the policy's
scoring and each call to a worker, whose W3C `traceparent` the worker receives (vLLM started with
`--otlp-traces-endpoint` then puts its own span under the gateway's).

Off by default. On when an OTLP endpoint is configured by OpenTelemetry's standard variables
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), unless `OTEL_SDK_DISABLED=true` or
`OTEL_TRACES_EXPORTER=none`; the SDK reads the rest itself (`OTEL_SERVICE_NAME` [turnout], `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_*` headers and timeouts, `OTEL_BSP_*` batching). Spans are exported over
OTLP/HTTP in batches, off the request path. When off, every function here returns at its first line.

Attributes follow the GenAI semantic conventions (`gen_ai.operation.name`, `gen_ai.provider.name`,
`gen_ai.request.model`, `gen_ai.response.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`, ...)
and add the gateway's own under `turnout.*` (policy, reason, predicted quality and cost, fallbacks, cost).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from server.telemetry.record import Exchange

_PROPAGATOR = TraceContextTextMapPropagator()
#: GenAI's operation names (`gen_ai.operation.name`) by the request log's endpoint.
OPERATIONS = {"chat": "chat", "completions": "text_completion", "responses": "chat", "messages": "chat",
              "embeddings": "embeddings", "rerank": "rerank", "score": "score", "count_tokens": "count_tokens"}
_tracer: trace.Tracer | None = None
_provider: Any = None  # the SDK's TracerProvider (not the process-wide one: a test process starts many gateways)


def enabled_by_env(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether the standard variables ask for traces (see the module docstring)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def start_tracing() -> bool:
    """Set up the tracer provider and its OTLP/HTTP exporter when the environment asks for traces (once per
    process); whether traces are on."""
    global _tracer, _provider
    if _tracer is not None:
        return True
    if not enabled_by_env():
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = os.environ.get("OTEL_SERVICE_NAME") or "turnout"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider, _tracer = provider, provider.get_tracer("turnout")
    return True


def stop_tracing() -> None:
    """Export what is pending and stop (at shutdown)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def tracing_on() -> bool:
    """Whether spans are being made."""
    return _tracer is not None


def request_span(endpoint: str, method: str, path: str, headers: Any) -> tuple[Span, object] | None:
    """Start a request's span (its parent: the client's `traceparent`, if any) and make it current; the caller
    detaches the returned token when its own work is done and ends the span when the request ends."""
    if _tracer is None:
        return None
    parent = _PROPAGATOR.extract(headers)
    operation = OPERATIONS.get(endpoint, endpoint)
    span = _tracer.start_span(operation, context=parent, kind=SpanKind.SERVER, attributes={
        "gen_ai.operation.name": operation, "gen_ai.provider.name": "vllm", "http.request.method": method,
        "url.path": path, "turnout.endpoint": endpoint})
    token = otel_context.attach(trace.set_span_in_context(span))
    return span, token


def detach(token: object) -> None:
    """Undo `request_span`'s attach (the span stays open until the request ends)."""
    otel_context.detach(token)  # type: ignore[arg-type]


@contextmanager
def child_span(name: str, **attributes: Any) -> Iterator[Span | None]:
    """A child of the current span for a step of the request (embedding, scoring), or nothing when off."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes={k: v for k, v in attributes.items() if v is not None}) \
            as span:
        yield span


def upstream_span(worker: str, model: str, url: str, headers: dict[str, str], operation: str) -> Span | None:
    """Start the span of one call to a worker (a child of the current span) and put its `traceparent` into the
    call's `headers`; the caller ends it when the call, or its stream, is over."""
    if _tracer is None:
        return None
    span = _tracer.start_span(f"{operation} {model}", kind=SpanKind.CLIENT, attributes={
        "gen_ai.operation.name": operation, "gen_ai.provider.name": "vllm", "gen_ai.request.model": model,
        "server.address": url, "turnout.worker": worker})
    _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
    return span


def end_upstream(span: Span | None, ok: bool, error: str | None = None, status: int | None = None) -> None:
    """End a worker call's span with how it went."""
    if span is None:
        return
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    if not ok:
        span.set_status(Status(StatusCode.ERROR, error))
        span.set_attribute("error.type", error or "error")
    span.end()


def end_request(span: Span, ex: Exchange) -> None:
    """Put what the request learned on its span (GenAI's attributes and the gateway's own) and end it."""
    attrs: dict[str, Any] = {
        "gen_ai.request.model": ex.requested_model, "gen_ai.response.model": ex.model,
        "gen_ai.usage.input_tokens": ex.prompt_tokens, "gen_ai.usage.output_tokens": ex.completion_tokens,
        "gen_ai.response.id": ex.response_id, "http.response.status_code": ex.http_status,
        "turnout.request_id": ex.request_id, "turnout.policy": ex.policy, "turnout.worker": ex.worker,
        "turnout.reason": ex.reason, "turnout.status": ex.status.value, "turnout.cost_usd": ex.cost_usd,
        "turnout.stream": ex.stream, "turnout.retries": ex.retries or None,
        "turnout.fallback_from": list(ex.fallback_from) or None, "turnout.shadow_model":
            ex.shadow.chosen if ex.shadow is not None else None,
    }
    d = ex.decision
    if d is not None:
        chosen = next((c for c in d.ranking if c.name == d.chosen), None)
        if chosen is not None:
            attrs["turnout.predicted_quality"] = chosen.predicted_quality
            attrs["turnout.predicted_cost_usd"] = chosen.predicted_cost_usd
        attrs["turnout.artifact"] = d.version
    span.set_attributes({k: v for k, v in attrs.items() if v is not None})
    if ex.status.is_error:  # a client's own error or leaving is no server error (OpenTelemetry's HTTP rules)
        span.set_status(Status(StatusCode.ERROR, ex.error))
        span.set_attribute("error.type", ex.status.value)
    span.end()
