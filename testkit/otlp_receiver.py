"""A minimal OTLP/HTTP trace receiver, run as its own process, for tests that check what the gateway (and vLLM)
export: ``POST /v1/traces`` takes OpenTelemetry's protobuf `ExportTraceServiceRequest` (gzip or not), as any
collector would; ``GET /spans`` answers every span received so far as JSON (ids in hex, attributes as plain values,
the service that sent it); ``POST /reset`` forgets them.

    python -m testkit.otlp_receiver --port 4318
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

_LOCK = threading.Lock()
_SPANS: list[dict[str, Any]] = []


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def decode(body: bytes) -> list[dict[str, Any]]:
    """The spans of one export, as plain dicts."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append({
                    "service": resource.get("service.name"), "name": span.name, "kind": span.kind,
                    "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(), "status": span.status.code,
                    "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
                    "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                })
    return out


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/reset":
            with _LOCK:
                _SPANS.clear()
            self._answer(200, b"{}", "application/json")
            return
        if self.path != "/v1/traces":
            self._answer(404, b"", "text/plain")
            return
        if self.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        try:
            spans = decode(body)
        except Exception as exc:  # a malformed export is the sender's bug: say so
            self._answer(400, str(exc).encode(), "text/plain")
            return
        with _LOCK:
            _SPANS.extend(spans)
        self._answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path == "/spans":
            with _LOCK:
                body = json.dumps(_SPANS).encode()
            self._answer(200, body, "application/json")
        elif self.path == "/health":
            self._answer(200, b"ok", "text/plain")
        else:
            self._answer(404, b"", "text/plain")


def main(argv: list[str] | None = None) -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser(prog="python -m testkit.otlp_receiver")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    ThreadingHTTPServer(("127.0.0.1", args.port), _Handler).serve_forever()


if __name__ == "__main__":
    main()
