"""Pure request/response logic of the fake vLLM worker: validation, token accounting, payloads.

Nothing here touches the network; :mod:`testkit.fakes.worker_stream` sends what this module builds.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from testkit.fakes.worker_apis import message_object, messages_frames, response_object, responses_frames

Kind = Literal["chat", "completion", "responses", "messages"]

DEFAULT_COMPLETION_TOKENS = 16
SYSTEM_FINGERPRINT = "fp_fake"
TOKEN_TEXT = "tok "

# Fault keys accepted in the per-request ``"fake"`` body field and in ``POST /fake/mode``.
FLOAT_FAULT_KEYS = ("ttft_ms", "itl_ms", "latency_ms")
INT_FAULT_KEYS = ("status", "drop_after")
BOOL_FAULT_KEYS = ("no_usage", "hang")
# ``reply``: the answer's whole text (instead of "tok " per token; usage still counts max_tokens), so tests can
# script what a worker says (a judge's verdict, a multiple-choice letter).
STR_FAULT_KEYS = ("reply",)
FAULT_KEYS = frozenset(FLOAT_FAULT_KEYS + INT_FAULT_KEYS + BOOL_FAULT_KEYS + STR_FAULT_KEYS)

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class FakeRequestError(Exception):
    """A request the fake rejects; carries the HTTP status and the vLLM-shaped error fields."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self, kind: str = "chat") -> bytes:
        """The JSON error body, shaped like vLLM's (on the Messages API, Anthropic's shape, as vLLM's)."""
        return error_body(self.status, self.message, self.param, kind)


def error_type(status: int) -> str:
    """The OpenAI/vLLM error ``type`` string for an HTTP status."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "InternalServerError" if status >= 500 else "BadRequestError"


def error_body(status: int, message: str, param: str | None = None, kind: str = "chat") -> bytes:
    """``{"error": {"message", "type", "param", "code"}}`` as vLLM answers errors; on the Messages API
    ``{"type": "error", "error": {"type", "message"}}``."""
    if kind == "messages":
        return orjson.dumps({"type": "error", "error": {"type": error_type(status), "message": message}})
    return orjson.dumps({"error": {"message": message, "type": error_type(status), "param": param, "code": status}})


@dataclass(frozen=True, slots=True)
class Faults:
    """Effective timing and fault settings for one request (worker defaults < mode < request)."""

    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    latency_ms: float = 0.0
    status: int | None = None
    drop_after: int | None = None
    no_usage: bool = False
    hang: bool = False
    reply: str | None = None

    def merged(self, overrides: dict[str, Any]) -> Faults:
        """A copy with the given (already validated) fault keys replaced."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(overrides)
        return Faults(**values)


def parse_faults(raw: object, where: str = "fake") -> dict[str, Any]:
    """Validate a fault dict (``"fake"`` body field or ``/fake/mode`` body); raise 400 on bad input."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FakeRequestError(400, f"`{where}` must be a JSON object", where)
    unknown = sorted(set(raw) - FAULT_KEYS)
    if unknown:
        raise FakeRequestError(400, f"unknown `{where}` keys {unknown}; allowed: {sorted(FAULT_KEYS)}", where)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in STR_FAULT_KEYS:
            if value is not None and not isinstance(value, str):
                raise FakeRequestError(400, f"`{where}.{key}` must be a string", where)
            out[key] = value
        elif key in BOOL_FAULT_KEYS:
            if not isinstance(value, bool):
                raise FakeRequestError(400, f"`{where}.{key}` must be a boolean", where)
            out[key] = value
        elif key in INT_FAULT_KEYS:
            if value is None:
                out[key] = None
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise FakeRequestError(400, f"`{where}.{key}` must be a non-negative integer", where)
            if key == "status" and not 100 <= value <= 599:
                raise FakeRequestError(400, f"`{where}.status` must be an HTTP status code", where)
            out[key] = value
        else:
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise FakeRequestError(400, f"`{where}.{key}` must be a non-negative number", where)
            out[key] = float(value)
    return out


def count_words(text: object) -> int:
    """Whitespace-separated words of a string (anything else counts 0)."""
    return len(text.split()) if isinstance(text, str) else 0


def _content_words(content: object) -> int:
    if isinstance(content, list):
        return sum(
            count_words(part.get("text")) for part in content
            if isinstance(part, dict) and part.get("type") in ("text", "input_text")
        )
    if content is None or isinstance(content, str):
        return count_words(content)
    raise FakeRequestError(400, "message content must be a string or a list of content parts", "messages")


EMBEDDING_DIM = 8


def fake_pooling(kind: str, raw: bytes, model: str, faults: Faults) -> tuple[dict[str, Any], dict[str, Any]]:
    """A pooling request's body and vLLM-shaped answer: `/v1/embeddings` (kind "embeddings"), `/v1/rerank` or
    `/v1/score`; `FakeRequestError` for a bad body, a wrong model or a `status` fault."""
    body = _pooling_body(raw, model, faults)
    return body, (_embeddings(body) if kind == "embeddings" else _scoring(kind, body))


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """One deterministic unit vector per input (from the text's hash); prompt tokens = words + 1 per input."""
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise FakeRequestError(400, "`input` must be a string or a non-empty list of strings", "input")
    tokens = sum(count_words(t) + 1 for t in texts)
    data = [{"index": i, "object": "embedding", "embedding": _unit_vector(t)} for i, t in enumerate(texts)]
    return {"id": "embd-fake", "object": "list", "created": int(time.time()), "model": body["model"], "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


def _unit_vector(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8", "replace")).digest()[:EMBEDDING_DIM]
    v = [b - 127.5 for b in digest]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def _similarity(a: str, b: str) -> float:
    return sum(x * y for x, y in zip(_unit_vector(a), _unit_vector(b), strict=True))


def _scoring(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """`/v1/rerank` (kind "rerank") or `/v1/score`: the cosine of the texts' fake embeddings, prompt tokens = words
    + 1 per text."""
    if kind == "rerank":
        query, docs = body.get("query"), body.get("documents")
        docs = [docs] if isinstance(docs, str) else docs
        if not isinstance(query, str) or not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
            raise FakeRequestError(400, "`query` must be a string and `documents` strings", "documents")
        ranked = sorted(range(len(docs)), key=lambda i: -_similarity(query, docs[i]))
        top = body.get("top_n") or len(docs)
        tokens = sum(count_words(t) + 1 for t in [query, *docs])
        results = [{"index": i, "document": {"text": docs[i]}, "relevance_score": _similarity(query, docs[i])}
                   for i in ranked[:top]]
        return {"id": "rerank-fake", "model": body["model"], "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    left, right = body.get("text_1"), body.get("text_2")
    left = [left] if isinstance(left, str) else left
    right = [right] if isinstance(right, str) else right
    if not (isinstance(left, list) and isinstance(right, list) and left and right
            and all(isinstance(t, str) for t in [*left, *right])):
        raise FakeRequestError(400, "`text_1` and `text_2` must be strings or lists of strings", "text_1")
    pairs = [(left[0], r) for r in right] if len(left) == 1 else list(zip(left, right, strict=False))
    tokens = sum(count_words(a) + count_words(b) + 2 for a, b in pairs)
    data = [{"index": i, "object": "score", "score": _similarity(a, b)} for i, (a, b) in enumerate(pairs)]
    return {"id": "score-fake", "object": "list", "created": int(time.time()), "model": body["model"],
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


def _pooling_body(raw: bytes, model: str, faults: Faults) -> dict[str, Any]:
    """A pooling request's JSON body, checked for its model and the `status` fault."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FakeRequestError(400, f"malformed JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise FakeRequestError(400, "the body must be a JSON object")
    if model != "*" and body.get("model") != model:
        raise FakeRequestError(404, f"The model `{body.get('model')}` does not exist.", "model")
    faults = faults.merged(parse_faults(body.pop("fake", None), "fake"))
    if faults.status is not None:
        raise FakeRequestError(faults.status, "injected failure")
    return body


def prompt_tokens_of(kind: Kind, body: dict[str, Any]) -> int:
    """Deterministic prompt token count (words + 1 per message, or words of the prompt + 1; a Responses input's
    and instructions' words, Anthropic's system's)."""
    if kind == "responses":
        given = body.get("input")
        if isinstance(given, str):
            return count_words(given) + 1 + count_words(body.get("instructions"))
        if not isinstance(given, list) or not given or not all(isinstance(m, dict) for m in given):
            raise FakeRequestError(400, "`input` must be a string or a non-empty list of items", "input")
        return sum(_content_words(m.get("content")) + 1 for m in given) + count_words(body.get("instructions"))
    if kind == "messages":
        system = body.get("system")
        return prompt_tokens_of("chat", body) + (_content_words(system) if system is not None else 0)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise FakeRequestError(400, "`messages` must be a non-empty list", "messages")
        total = 0
        for message in messages:
            if not isinstance(message, dict):
                raise FakeRequestError(400, "each message must be an object", "messages")
            total += _content_words(message.get("content")) + 1
        return total
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return count_words(prompt) + 1
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return sum(count_words(p) for p in prompt) + 1
    raise FakeRequestError(400, "`prompt` must be a string or a non-empty list of strings", "prompt")


_LENGTH_FIELDS: dict[str, tuple[str, ...]] = {"chat": ("max_completion_tokens", "max_tokens"),
                                              "completion": ("max_tokens",), "responses": ("max_output_tokens",),
                                              "messages": ("max_tokens",)}


def _requested_max_tokens(kind: Kind, body: dict[str, Any]) -> tuple[int | None, str]:
    names = _LENGTH_FIELDS[kind]
    if kind == "messages" and body.get("max_tokens") is None:
        raise FakeRequestError(400, "`max_tokens` is required", "max_tokens")
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FakeRequestError(400, f"`{name}` must be a positive integer", name)
        return value, name
    return None, names[-1]


@dataclass(frozen=True, slots=True)
class CompletionJob:
    """A validated completion request: everything needed to answer it."""

    kind: Kind
    model: str
    prompt_tokens: int
    completion_tokens: int
    stream: bool
    include_usage: bool
    faults: Faults
    answer_id: str = ""
    previous_response_id: str | None = None
    continuous_usage: bool = False  # `stream_options.continuous_usage_stats`: usage on every chunk, as vLLM does


#: `--model '*'`: serve whatever model a request names, and answer as that model.
ANY_MODEL = "*"


def parse_job(kind: Kind, body: object, served_model: str, max_model_len: int, base: Faults,
              stored: dict[str, dict[str, Any]] | None = None) -> CompletionJob:
    """Validate a parsed request body against the worker; raise :class:`FakeRequestError` on rejection.
    `stored`: the Responses API's stored responses, which a `previous_response_id` continues (404 when unknown,
    as vLLM answers; the conversation's tokens join the prompt)."""
    if not isinstance(body, dict):
        raise FakeRequestError(400, "request body must be a JSON object")
    faults = base.merged(parse_faults(body.get("fake")))
    model = body.get("model")
    if served_model == ANY_MODEL and isinstance(model, str) and model:
        served_model = model  # one process standing in for several models (the side-by-side benchmark)
    if model != served_model:
        raise FakeRequestError(404, f"The model `{model}` does not exist.", "model")
    prompt_tokens = prompt_tokens_of(kind, body)
    previous = body.get("previous_response_id") if kind == "responses" else None
    if previous is not None:
        earlier = (stored or {}).get(previous) if isinstance(previous, str) else None
        if earlier is None:
            raise FakeRequestError(404, f"Response with id '{previous}' not found.", "response_id")
        prompt_tokens += int(earlier["usage"]["total_tokens"]) if earlier.get("usage") else 0
    max_tokens, param = _requested_max_tokens(kind, body)
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise FakeRequestError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            param,
        )
    if max_tokens is None and prompt_tokens >= max_model_len:
        raise FakeRequestError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
            "messages" if kind == "chat" else "prompt",
        )
    completion_tokens = (
        max_tokens if max_tokens is not None else min(DEFAULT_COMPLETION_TOKENS, max_model_len - prompt_tokens)
    )
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    continuous = include_usage and isinstance(options, dict) and options.get("continuous_usage_stats") is True
    return CompletionJob(kind, served_model, prompt_tokens, completion_tokens, stream, include_usage, faults,
                         new_id(kind), previous, continuous)


def _usage(job: CompletionJob) -> dict[str, int]:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.completion_tokens,
        "total_tokens": job.prompt_tokens + job.completion_tokens,
    }


_ID_PREFIXES = {"chat": "chatcmpl-", "completion": "cmpl-", "responses": "resp_", "messages": "msg_"}


def new_id(kind: Kind) -> str:
    """``chatcmpl-<hex>``, ``cmpl-<hex>``, ``resp_<hex>`` or ``msg_<hex>``."""
    return _ID_PREFIXES[kind] + secrets.token_hex(16)


def answer_text(job: CompletionJob) -> str:
    """The whole answer's text: the scripted reply, or one "tok " per token."""
    return job.faults.reply if job.faults.reply is not None else TOKEN_TEXT * job.completion_tokens


def full_response(job: CompletionJob) -> bytes:
    """The non-streaming JSON answer."""
    text = answer_text(job)
    if job.kind == "responses":
        return orjson.dumps(response_object(job, text))
    if job.kind == "messages":
        return orjson.dumps(message_object(job, text))
    choice: dict[str, Any]
    if job.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
    payload: dict[str, Any] = {
        "id": job.answer_id,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": [choice],
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if not job.faults.no_usage:
        payload["usage"] = _usage(job)
    return orjson.dumps(payload)


def sse(payload: object) -> bytes:
    """One server-sent event ``data: <json>\\n\\n``."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class StreamFrames:
    """Pre-encoded SSE frames of one streaming answer: token frames are identical, so built once, except on the
    Responses API, whose events are numbered (`tokens`, one each)."""

    head: bytes
    token: bytes
    tail: bytes
    tokens: list[bytes] | None = None

    def first(self, n: int) -> bytes:
        """The first `n` token frames."""
        return b"".join(self.tokens[:n]) if self.tokens is not None else self.token * n

    def at(self, i: int) -> bytes:
        """Token frame `i`."""
        return self.tokens[i] if self.tokens is not None else self.token


def stream_frames(job: CompletionJob) -> StreamFrames:
    """Build the frames of a streamed answer, shaped like vLLM's chunks (or events)."""
    piece = TOKEN_TEXT if job.faults.reply is None else ""  # a scripted reply comes whole in the first frame
    if job.kind == "responses":
        head, tokens, tail = responses_frames(job, answer_text(job), piece)
        return StreamFrames(head, b"", tail, tokens)
    if job.kind == "messages":
        return StreamFrames(*messages_frames(job, piece))
    common: dict[str, Any] = {
        "id": job.answer_id,
        "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": job.model,
    }

    def chunk(choice_fields: dict[str, Any]) -> bytes:
        return sse({**common, "choices": [{"index": 0, **choice_fields, "logprobs": None, "finish_reason": None}]})

    reply = job.faults.reply
    if job.kind == "chat":
        head = chunk({"delta": {"role": "assistant", "content": reply or ""}})
        token = chunk({"delta": {"content": piece}})
    else:
        head = b"" if reply is None else chunk({"text": reply})
        token = chunk({"text": piece})
    # As vLLM does: the fingerprint goes on the final chunk, which is the usage chunk when usage was asked for.
    usage_last = job.include_usage and not job.faults.no_usage
    ending: dict[str, Any] = {"delta": {}} if job.kind == "chat" else {"text": ""}
    final = {**common, "choices": [{"index": 0, **ending, "logprobs": None, "finish_reason": "length",
                                    "stop_reason": None}]}
    tail = sse(final if usage_last else {**final, "system_fingerprint": SYSTEM_FINGERPRINT})
    if usage_last:
        tail += sse({**common, "choices": [], "usage": _usage(job), "system_fingerprint": SYSTEM_FINGERPRINT})
    if job.continuous_usage and not job.faults.no_usage:  # each token's chunk says the usage so far
        field = {"delta": {"content": piece}} if job.kind == "chat" else {"text": piece}
        tokens = [sse({**common, "choices": [{"index": 0, **field, "logprobs": None, "finish_reason": None}],
                       "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": i + 1,
                                 "total_tokens": job.prompt_tokens + i + 1}})
                  for i in range(job.completion_tokens)]
        return StreamFrames(head, token, tail + SSE_DONE, tokens)
    return StreamFrames(head, token, tail + SSE_DONE)
