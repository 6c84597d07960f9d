"""What `GET /openapi.json` says about each endpoint: request bodies, answers and every error status.

The handlers read the raw request (the body is forwarded as the client wrote it, so it is never parsed into a
model by FastAPI); their request and response schemas are given to the route decorators from here instead.
Request bodies are the very models the gateway validates with (`server.api.protocol`, `FeedbackBody`, `KeyConfig`),
so the schema cannot drift from the validation. The fuzz test (`tests/integration/test_fuzz.py`) holds every
answer of a running gateway to these schemas.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from server.api.feedback import FeedbackBody
from server.api.openapi_answers import (
    SSE_EVENT,
    SSE_NAMED_EVENT,
    ChatCompletion,
    EmbeddingList,
    MessageObject,
    RerankList,
    ResponseObject,
    ScoreList,
    TextCompletion,
    TokenCount,
)
from server.api.openapi_models import (
    Alive,
    AnthropicErrorResponse,
    ConfigErrorResponse,
    ErrorResponse,
    FeedbackResult,
    KeyCreated,
    KeyRevoked,
    ModelList,
    Readiness,
    Reloaded,
    RouteExplanation,
    StatusSnapshot,
)
from server.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CountTokensRequest,
    EmbeddingRequest,
    MessagesRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
)
from server.config import KeyConfig

JSON = dict[str, Any]
#: The `responses=` argument of a route decorator: by status (or range, such as "4XX").
Responses = dict[int | str, JSON]


def inline_schema(model: type[BaseModel]) -> JSON:
    """`model`'s JSON schema with its `$defs` written in place: an operation's `requestBody` schema must stand
    alone (a `#/$defs/...` reference would point at the root of the OpenAPI document)."""
    schema = model.model_json_schema()
    defs: dict[str, JSON] = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                siblings = {k: v for k, v in node.items() if k != "$ref"}
                return {**resolve(copy.deepcopy(defs[ref.removeprefix("#/$defs/")])), **resolve(siblings)}
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: JSON = resolve(schema)
    return resolved


def json_body(schema: JSON, example: JSON | None = None) -> JSON:
    """`openapi_extra` giving an operation its (required) JSON request body."""
    media: JSON = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"requestBody": {"required": True, "content": {"application/json": media}}}


def _header(description: str) -> JSON:
    return {"description": description, "required": True, "schema": {"type": "string"}}


REQUEST_ID_HEADER: JSON = {"x-turnout-request-id": _header("This request's id (in the request log; for feedback).")}
#: What every answer of the completion endpoints carries (README: "Every response carries ...").
ROUTING_HEADERS: JSON = {
    **REQUEST_ID_HEADER,
    "x-turnout-model": _header("The worker that answered (empty when none was reached)."),
    "x-turnout-policy": _header("The policy that chose it (empty when no policy was involved)."),
    "x-turnout-overhead-ms": _header("Time spent in the gateway, the wait on the worker excluded."),
}

_ERRORS: dict[int | str, str] = {
    400: "The body is not JSON, not an object, or breaks the schema (`param` names the field); or the worker "
         "refused it.",
    401: "Missing or unknown key (client keys when `auth.enabled`; the admin key on `/admin`; the operations token "
         "on `/metrics` and `/ui/status.json` when `auth.enabled`).",
    403: "The key may not use this policy or model; or the admin endpoints (or, with client keys on, the metrics) "
         "are disabled until their secret is set.",
    404: "Not found (model, policy, key or request id; see `code`).",
    409: "A key with this name exists (admin); or the one worker holding a stored response cannot be reached "
         "(Responses API).",
    413: "The body is larger than the limit.",
    429: "The key is over its requests or tokens per minute, or its budget; on `/admin` and the metrics, too many "
         "failed admin key or token attempts (`Retry-After`).",
    500: "A bug in the gateway (never expected); no details.",
    502: "The worker is unreachable, refused the gateway's credentials, or answered 5xx.",
    503: "No healthy worker for the model, no free upstream connection, or shared state unavailable "
         "(`Retry-After`).",
    504: "The worker did not answer in time.",
    # A worker's own 4xx reaches the client as it is (message and code), whatever its status.
    "4XX": "Another client error, from the worker, passed through with its message and code.",
}


def _error(status: int | str, headers: JSON, model: type[BaseModel]) -> JSON:
    return {"model": model, "description": _ERRORS[status], "headers": headers}


def errors(*statuses: int | str, headers: JSON = REQUEST_ID_HEADER,
           model: type[BaseModel] = ErrorResponse) -> Responses:
    """The error answers of an operation, and 500, which any route answers on a bug; `model`: the error shape
    of the operation's API (OpenAI's, or Anthropic's on its paths)."""
    return {**{s: _error(s, headers, model) for s in statuses}, 500: _error(500, REQUEST_ID_HEADER, model)}


def ok(model: type[BaseModel], description: str, status: int = 200) -> Responses:
    """A JSON answer of the gateway's own."""
    return {status: {"model": model, "description": description, "headers": REQUEST_ID_HEADER}}


def _completion(model: type[BaseModel], what: str, stream: str = "its chunks as server-sent events, ending with "
                "`data: [DONE]`", *, events: JSON = SSE_EVENT, error: type[BaseModel] = ErrorResponse,
                more_errors: tuple[int, ...] = ()) -> Responses:
    return {
        200: {
            "model": model,
            "description": f"The worker's {what} as it answered it (`application/json`), or with `\"stream\": true` "
                           f"{stream}.",
            "headers": ROUTING_HEADERS,
            "content": {"text/event-stream": {"schema": events}},
        },
        **errors(400, 401, 403, 404, *more_errors, 413, 429, 502, 503, 504, "4XX", headers=ROUTING_HEADERS,
                 model=error),
        499: {"description": "The client went away before the answer (logged and counted; nobody receives it).",
              "headers": ROUTING_HEADERS},
    }


CHAT_EXAMPLE: JSON = {"model": "auto", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}

CHAT_BODY = json_body(inline_schema(ChatCompletionRequest), CHAT_EXAMPLE)
CHAT_RESPONSES = _completion(ChatCompletion, "`chat.completion`")
COMPLETION_BODY = json_body(inline_schema(CompletionRequest), {"model": "auto", "prompt": "Once", "max_tokens": 8})
COMPLETION_RESPONSES = _completion(TextCompletion, "`text_completion`")

RESPONSES_BODY = json_body(inline_schema(ResponsesRequest),
                           {"model": "auto", "input": "Say hello.", "max_output_tokens": 16})
RESPONSES_RESPONSES = _completion(
    ResponseObject, "`response`", "its events as server-sent events (`response.created` ... `response.completed`; a "
    "failure after the start ends with an `error` event)", events=SSE_NAMED_EVENT, more_errors=(409,))
MESSAGES_BODY = json_body(inline_schema(MessagesRequest),
                          {"model": "auto", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello."}]})
MESSAGES_RESPONSES = _completion(
    MessageObject, "`message`", "its events as server-sent events (`message_start` ... `message_stop`; a failure "
    "after the start ends with an `error` event)", events=SSE_NAMED_EVENT, error=AnthropicErrorResponse)
COUNT_TOKENS_BODY = json_body(inline_schema(CountTokensRequest),
                              {"model": "auto", "messages": [{"role": "user", "content": "Say hello."}]})
COUNT_TOKENS_RESPONSES: Responses = {
    200: {"model": TokenCount, "description": "The prompt's tokens, as the worker the request would go to counts "
          "them (free: no budget is spent).", "headers": ROUTING_HEADERS},
    **errors(400, 401, 403, 404, 413, 429, 502, 503, 504, "4XX", headers=ROUTING_HEADERS,
             model=AnthropicErrorResponse),
    499: {"description": "The client went away before the answer.", "headers": ROUTING_HEADERS},
}
#: The path parameter of `GET /v1/responses/{response_id}` and its cancel.
RESPONSE_ID_PARAM: JSON = {"parameters": [{"name": "response_id", "in": "path", "required": True,
                                           "description": "A response's id, as `POST /v1/responses` answered it.",
                                           "schema": {"type": "string", "minLength": 1}}]}
STORED_RESPONSE_RESPONSES: Responses = {
    **ok(ResponseObject, "The response, from the worker that made it."),
    **errors(400, 401, 404, 409, 502, 503, "4XX"),
}


def _pooling(model: type[BaseModel], what: str) -> Responses:
    return {
        200: {"model": model, "description": f"The pooling worker's {what} as it answered them.",
              "headers": ROUTING_HEADERS},
        **errors(400, 401, 403, 404, 413, 429, 502, 503, 504, "4XX", headers=ROUTING_HEADERS),
        499: {"description": "The client went away before the answer (logged and counted; nobody receives it).",
              "headers": ROUTING_HEADERS},
    }


EMBEDDINGS_BODY = json_body(inline_schema(EmbeddingRequest), {"model": "my-embedder", "input": ["Say hello."]})
EMBEDDINGS_RESPONSES = _pooling(EmbeddingList, "embeddings")
RERANK_BODY = json_body(inline_schema(RerankRequest),
                        {"model": "my-reranker", "query": "capital of France", "documents": ["Paris", "Lyon"]})
RERANK_RESPONSES = _pooling(RerankList, "ranking")
SCORE_BODY = json_body(inline_schema(ScoreRequest), {"model": "my-reranker", "text_1": "a cat", "text_2": ["a dog"]})
SCORE_RESPONSES = _pooling(ScoreList, "scores")

ROUTE_BODY = json_body(inline_schema(ChatCompletionRequest), CHAT_EXAMPLE)
ROUTE_RESPONSES: Responses = {
    **ok(RouteExplanation, "The decision, computed as for a real request; no worker is called."),
    **errors(400, 401, 403, 404, 413, 503),
}
FEEDBACK_BODY = json_body(inline_schema(FeedbackBody))
FEEDBACK_RESPONSES: Responses = {
    **ok(FeedbackResult, "The score was given to the policy, or ignored as a repeat."),
    **errors(400, 401, 404, 413, 503),
}


def _key_schemas() -> tuple[JSON, JSON]:
    """(the body of `POST /admin/keys`, one key of `GET /admin/keys`): a key's rules, never the key or its hash."""
    schema = inline_schema(KeyConfig)
    schema.pop("description", None)
    for secret in ("key_sha256", "key_env"):
        schema["properties"].pop(secret)
    body = {**schema, "title": "KeyRules", "description": "A new stored key's rules; the gateway makes the key."}
    listed = copy.deepcopy(schema)
    listed["title"] = "ListedKey"
    listed["properties"]["source"] = {"enum": ["config", "store"], "type": "string"}
    listed["required"] = list(listed["properties"])  # every rule is listed, unset ones as null or empty
    for prop in listed["properties"].values():
        prop.pop("default", None)
    return body, listed


_KEY_BODY, _LISTED_KEY = _key_schemas()
_ADMIN = (401, 403, 429)

RELOAD_RESPONSES: Responses = {
    **ok(Reloaded, "The config file was valid and is in force."),
    **errors(*_ADMIN),
    400: {"model": ConfigErrorResponse, "description": "The config file is invalid (every problem is listed); "
          "the running config keeps serving.", "headers": REQUEST_ID_HEADER},
}
LIST_KEYS_RESPONSES: Responses = {
    200: {"description": "Every key's rules: from the config file, and stored ones.", "headers": REQUEST_ID_HEADER,
          "content": {"application/json": {"schema": {
              "type": "object", "title": "KeyList", "additionalProperties": False, "required": ["keys"],
              "properties": {"keys": {"type": "array", "items": _LISTED_KEY}}}}}},
    **errors(*_ADMIN, 503),
}
ADD_KEY_BODY = json_body(_KEY_BODY, {"name": "team-a", "requests_per_minute": 60})
ADD_KEY_RESPONSES: Responses = {**ok(KeyCreated, "The key was made and stored.", 201),
                                **errors(400, *_ADMIN, 409, 413, 503)}
#: The path parameter of `DELETE /admin/keys/{name}`, declared here because the handler reads it from the request.
KEY_NAME_PARAM: JSON = {"parameters": [{"name": "name", "in": "path", "required": True,
                                        "description": "The stored key's name.",
                                        "schema": {"type": "string", "minLength": 1}}]}
REVOKE_KEY_RESPONSES: Responses = {
    **ok(KeyRevoked, "The stored key no longer works (on every replica within seconds)."),
    **errors(*_ADMIN, 404, 503),
}

MODELS_RESPONSES = {**ok(ModelList, "Served models, `auto`, and every policy as `turnout/<policy>` (with client keys "
                           "on, those the key may use)."), **errors(401, 503)}
HEALTHZ_RESPONSES = {**ok(Alive, "The process is alive."), **errors()}
READYZ_RESPONSES: Responses = {
    **ok(Readiness, "At least one worker is up."),
    503: {"model": Readiness, "description": "No worker is up.", "headers": REQUEST_ID_HEADER},
    **errors(),
}
#: With client keys on, the operations token is needed: 401 without it, 403 while none is set, 429 after guesses.
STATUS_RESPONSES = {**ok(StatusSnapshot, "The status page's numbers."), **errors(*_ADMIN)}
#: For the HTML page and the Prometheus text: their media type comes from the route's `response_class`, which
#: FastAPI would give a `model` too, so their error is spelled out as JSON.
TEXT_RESPONSES: Responses = {
    200: {"headers": REQUEST_ID_HEADER},
    500: {"description": _ERRORS[500], "headers": REQUEST_ID_HEADER,
          "content": {"application/json": {"schema": inline_schema(ErrorResponse)}}},
}
METRICS_RESPONSES: Responses = {
    **TEXT_RESPONSES,
    **{s: {"description": _ERRORS[s], "headers": REQUEST_ID_HEADER,
           "content": {"application/json": {"schema": inline_schema(ErrorResponse)}}} for s in _ADMIN},
}
