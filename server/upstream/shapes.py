"""The event streams of the three generating APIs the gateway relays, each described once: how it ends, where
its usage is, which events are the worker's own failures, and how the gateway ends it when the worker breaks off.

- OpenAI chat and text completions (`CHAT`): `data:` chunks, the usage on a chunk of its own (asked for with
  `stream_options`, relayed only when the client asked), the end `data: [DONE]`; a failure ends with an error
  chunk and `[DONE]`.
- OpenAI Responses (`RESPONSES`): named events (`event: response.output_text.delta` ...), the id on
  `response.created`, the usage on the final `response.completed` (or `response.incomplete` / `response.failed`),
  which ends it; a failure ends with the API's `error` event.
- Anthropic Messages (`MESSAGES`): named events, input tokens on `message_start`, the final usage on
  `message_delta`, the end `message_stop`; a failure ends with Anthropic's `error` event.

Only events that can matter are parsed: the relay's hot path is a byte search per event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from server.errors import GatewayError, anthropic_type
from server.upstream.sse import event_data

DONE = b"[DONE]"
ShapeName = Literal["chat", "responses", "messages"]


@dataclass(slots=True)
class Seen:
    """What one event of a stream told: `end` (the stream's final event), `usage` (its usage object, any of the
    three APIs' shapes; `usage_final` False when more is to come, as on `message_start`, whose input tokens the
    final `message_delta` completes), `failed` (the worker's own error event), `response_id` (a Responses
    stream's id), `usage_only` (an OpenAI usage chunk with no choices), `texts` (answer text, read only when
    asked)."""

    end: bool = False
    usage: dict[str, Any] | None = None
    usage_final: bool = True
    failed: bool = False
    response_id: str | None = None
    usage_only: bool = False
    texts: tuple[str, ...] = ()
    finish: bool = False  # an OpenAI chunk ending a choice (its finish_reason set)
    fingerprint: str | None = None  # the `system_fingerprint` a usage-only chunk carries


_NOTHING = Seen()


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


@dataclass(frozen=True, slots=True)
class StreamShape:
    """One API's event stream (see the module docstring)."""

    name: ShapeName
    last_event: str  # what the stream's end is called, for the error when a worker ends without it

    def read(self, data: bytes, want_text: bool) -> Seen:
        """What the event whose `data:` payload is `data` tells (`want_text`: collect answer text as well)."""
        if self.name == "chat":
            return _read_chat(data, want_text)
        if self.name == "responses":
            return _read_responses(data, want_text)
        return _read_messages(data, want_text)

    def failure(self, err: GatewayError, last_data: bytes) -> bytes:
        """The events that end a stream the gateway must cut (`last_data`: the last event relayed)."""
        if self.name == "chat":
            return b"data: " + orjson.dumps(err.body()) + b"\n\ndata: [DONE]\n\n"
        if self.name == "responses":
            last = _loads(last_data) or {}
            seq = last.get("sequence_number")
            event: dict[str, Any] = {"type": "error", "code": err.code, "message": err.message, "param": None,
                                     "sequence_number": seq + 1 if isinstance(seq, int) else 0}
        else:
            event = {"type": "error", "error": {"type": anthropic_type(err.status), "message": err.message}}
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


CHAT = StreamShape("chat", "[DONE]")
RESPONSES = StreamShape("responses", "response.completed")
MESSAGES = StreamShape("messages", "message_stop")


_FINISHED = (b'"finish_reason":"', b'"finish_reason": "')  # a finish_reason that is not null


def _read_chat(data: bytes, want_text: bool) -> Seen:
    if data == DONE:
        return Seen(end=True)
    finish = any(f in data for f in _FINISHED)
    if not want_text and not finish and b'"usage"' not in data and b'"error"' not in data:
        return _NOTHING
    obj = _loads(data)
    if obj is None:
        return _NOTHING
    texts = tuple(answer_texts(obj)) if want_text else ()
    if "error" in obj:
        return Seen(failed=True, texts=texts)
    usage = obj.get("usage")
    if isinstance(usage, dict) and usage:
        # Only the usage-only chunk at the end is the whole answer's: with `continuous_usage_stats` every chunk
        # carries the usage so far, which a stream cut short must not be charged as (it may have generated more).
        last = not obj.get("choices")
        fingerprint = obj.get("system_fingerprint")
        return Seen(usage=usage, usage_only=last, usage_final=last, texts=texts, finish=finish and not last,
                    fingerprint=fingerprint if isinstance(fingerprint, str) else None)
    return Seen(texts=texts, finish=finish) if texts or finish else _NOTHING


def with_fingerprint(event: bytes, fingerprint: str) -> bytes:
    """A chunk's event with `system_fingerprint` set (vLLM puts it on the usage chunk when usage is asked for,
    and on the final chunk otherwise: a client that did not ask for usage gets it where it would have)."""
    data = event_data(event)
    obj = _loads(data) if data is not None else None
    if obj is None:
        return event
    return b"data: " + orjson.dumps({**obj, "system_fingerprint": fingerprint})



#: The named events each API's reader looks into, and the one that only carries answer text.
_RESPONSES_EVENTS = (b'"response.created"', b'"error"', b'"response.completed"', b'"response.incomplete"',
                     b'"response.failed"')
_MESSAGES_EVENTS = (b'"message_stop"', b'"message_delta"', b'"message_start"', b'"error"')


def _event(data: bytes, markers: tuple[bytes, ...], text_marker: bytes, want_text: bool) -> dict[str, Any] | None:
    """The event's JSON when its bytes name one of `markers` (or the text event, when text is wanted); None for
    the rest, which are relayed without being parsed."""
    if not (any(m in data for m in markers) or (want_text and text_marker in data)):
        return None
    return _loads(data)


def _read_responses(data: bytes, want_text: bool) -> Seen:
    obj = _event(data, _RESPONSES_EVENTS, b'"response.output_text.delta"', want_text)
    if obj is None:
        return _NOTHING
    kind = obj.get("type")
    given = obj.get("response")
    response: dict[str, Any] = given if isinstance(given, dict) else {}
    if kind == "response.created":
        rid = response.get("id")
        return Seen(response_id=rid if isinstance(rid, str) else None)
    if kind == "response.output_text.delta":
        delta = obj.get("delta")
        return Seen(texts=(delta,)) if isinstance(delta, str) else _NOTHING
    if kind == "error":
        return Seen(failed=True)
    if kind in ("response.completed", "response.incomplete", "response.failed"):
        usage = response.get("usage")
        return Seen(end=True, failed=kind == "response.failed", usage=usage if isinstance(usage, dict) else None)
    return _NOTHING


def _read_messages(data: bytes, want_text: bool) -> Seen:
    obj = _event(data, _MESSAGES_EVENTS, b'"content_block_delta"', want_text)
    if obj is None:
        return _NOTHING
    kind = obj.get("type")
    if kind == "message_stop":
        return Seen(end=True)
    if kind == "error":
        return Seen(failed=True)
    if kind == "message_delta":  # the final usage (vLLM's has input and output tokens; Anthropic's output only)
        usage = obj.get("usage")
        return Seen(usage=usage) if isinstance(usage, dict) else _NOTHING
    if kind == "message_start":
        message = obj.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        return Seen(usage=usage, usage_final=False) if isinstance(usage, dict) else _NOTHING
    if kind == "content_block_delta":
        delta = obj.get("delta")
        text = delta.get("text") if isinstance(delta, dict) else None
        return Seen(texts=(text,)) if isinstance(text, str) else _NOTHING
    return _NOTHING


def answer_texts(obj: dict[str, Any]) -> list[str]:
    """The answer text in a whole answer or a chunk of any of the three APIs: each choice's message or delta
    content or text (OpenAI), each `output_text` of the output (Responses), each text block (Messages)."""
    out: list[str] = []
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        part = choice.get("message") or choice.get("delta")
        text = part.get("content") if isinstance(part, dict) else choice.get("text")
        if isinstance(text, str):
            out.append(text)
    output = obj.get("output")
    for item in output if isinstance(output, list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        out += [p["text"] for p in content if isinstance(p, dict) and p.get("type") == "output_text"
                and isinstance(p.get("text"), str)] if isinstance(content, list) else []
    content = obj.get("content")
    if obj.get("type") == "message" and isinstance(content, list):
        out += [b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text"
                and isinstance(b.get("text"), str)]
    return out
