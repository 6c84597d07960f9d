"""The answers of the relayed APIs as the worker (vLLM) gives them, as pydantic models for `/openapi.json`
(`server.api.openapi` puts them on the routes): chat and text completions, Responses, Messages, embeddings,
rerank, score, and their server-sent events. The gateway passes them through unchanged, so they are open
(`extra="allow"`) to the worker's extra fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import SkipJsonSchema

# --- Completions, as the worker (vLLM) answers them: passed through unchanged, so open to its extra fields ---


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Open):
    """Token counts (vLLM may leave `completion_tokens` null; pooling answers leave it out)."""

    prompt_tokens: int
    completion_tokens: int | SkipJsonSchema[None] = None
    total_tokens: int


class AssistantMessage(_Open):
    """The generated message (vLLM adds `tool_calls`, `reasoning_content`, ...)."""

    role: str
    content: str | None


class ChatChoice(_Open):
    """One generated answer."""

    index: int
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletion(_Open):
    """`object: chat.completion`, as vLLM and OpenAI answer it."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | SkipJsonSchema[None] = None


class TextChoice(_Open):
    """One generated text."""

    index: int
    text: str
    finish_reason: str | None


class TextCompletion(_Open):
    """`object: text_completion`, as vLLM and OpenAI answer it."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | SkipJsonSchema[None] = None


class Embedding(_Open):
    """One input's vector (a base64 string with `encoding_format: base64`)."""

    index: int
    object: Literal["embedding"]
    embedding: list[float] | str


class EmbeddingList(_Open):
    """`object: list` of embeddings, as vLLM's pooling server and OpenAI answer it."""

    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: Usage | SkipJsonSchema[None] = None


class RerankResult(_Open):
    """One document's place: its index in the request and its relevance (vLLM adds the document)."""

    index: int
    relevance_score: float


class RerankList(_Open):
    """Documents by relevance, as vLLM's pooling server answers `/v1/rerank`."""

    model: str
    results: list[RerankResult]
    usage: Usage | SkipJsonSchema[None] = None


class ScoreData(_Open):
    """One pair's score."""

    index: int
    score: float


class ScoreList(_Open):
    """`object: list` of scores, as vLLM's pooling server answers `/v1/score`."""

    object: Literal["list"]
    model: str
    data: list[ScoreData]
    usage: Usage | SkipJsonSchema[None] = None


class ResponsesUsage(_Open):
    """A Responses API answer's token counts."""

    input_tokens: int
    output_tokens: int
    total_tokens: int


class ResponseObject(_Open):
    """`object: response`, as vLLM and OpenAI answer the Responses API."""

    id: str
    object: Literal["response"]
    model: str
    status: str | None = None
    output: list[dict[str, Any]]
    usage: ResponsesUsage | SkipJsonSchema[None] = None


class MessagesUsage(_Open):
    """A Messages API answer's token counts."""

    input_tokens: int
    output_tokens: int


class MessageObject(_Open):
    """`type: message`, as vLLM and Anthropic answer the Messages API."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None = None
    usage: MessagesUsage


class TokenCount(_Open):
    """`POST /v1/messages/count_tokens`: the prompt's tokens."""

    input_tokens: int


#: One server-sent event of the Responses or Messages API: named (`event: response.output_text.delta`,
#: `event: message_start`, ...), its data a JSON object; a failure after the start is an `error` event.
SSE_NAMED_EVENT: dict[str, object] = {
    "type": "object",
    "required": ["data", "event"],
    "properties": {
        "event": {"type": "string", "description": "The event's type, as its data's `type` says it."},
        "data": {"type": "string", "description": "A JSON object."},
    },
}

#: One server-sent event of a chat or text completion stream, as a client's SSE parser sees it. The gateway relays
#: the worker's `data:` lines (JSON chunks, then `[DONE]`; a failure after the start is a final `{"error": ...}`
#: event), which are never named, so every event is a plain message.
SSE_EVENT: dict[str, object] = {
    "type": "object",
    "required": ["data", "event"],
    "properties": {
        "event": {"const": "message"},
        "data": {"type": "string", "description": "A JSON chunk, an `{\"error\": ...}` object, or `[DONE]`."},
    },
}
