"""OpenAI request schemas, used to validate what the gateway relies on and to name the bad field.

Validation is deliberately partial: known fields are type-checked, unknown fields (vLLM's extra
sampling parameters, future OpenAI fields) are allowed and forwarded untouched, because the gateway
forwards the client's own JSON, not a re-serialised model. One exception: chat's `messages` sent to the text
completion endpoint is refused (400). JSON nested too deep to be written out again is refused where it is
written (`server.upstream.forward.encode_json`, `server.quota.limits.prompt_tokens_bound`).
These models are also the request bodies of `/openapi.json` (`server.api.openapi`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from server.api.prompts import content_text, prompt_text
from server.config import field_path
from server.errors import GatewayError, bad_request
from server.policy.options import RouteOptions

T = TypeVar("T")
#: A list validated up to its first bad item: a list of many bad items costs what one does (each would otherwise be
#: validated and reported: 150,000 took 0.8 s of CPU, and a 4 MiB body holds more than ten times as many).
Items = Annotated[list[T], Field(fail_fast=True)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    """One part of a multi-part message content (text, or another type the worker understands)."""

    # The JSON schema of the check below, for `/openapi.json`.
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"type": {"const": "text"}}, "required": ["type"]},
        "then": {"properties": {"text": {"type": "string"}}, "required": ["text"]},
    })

    type: StrictStr
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_has_text(self) -> TextPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a part of type 'text' needs a string 'text'")
        return self


class ChatMessage(_Open):
    """A chat message; content may be text, a list of parts, or absent (assistant tool calls)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | Items[TextPart] | None = None


class StreamOptions(_Open):
    """`stream_options`; the gateway always asks the worker for usage."""

    include_usage: StrictBool | None = None


class OpenAIRequest(_Open):
    """What chat and text completion requests share: model, sampling, streaming, and Turnout's own field."""

    model: StrictStr = Field(min_length=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    # Chat's newer name for max_tokens. Checked on both endpoints: a keyed request's worst case reads both.
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    temperature: Annotated[float, Field(strict=True, ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(strict=True, gt=0, le=1)] | None = None
    user: StrictStr | None = None
    turnout: RouteOptions | None = None

    #: Fields that belong to the other endpoint, refused by name (see `CompletionRequest`).
    misplaced: ClassVar[dict[str, str]] = {}

    def session(self) -> str | None:
        """The session affinity keeps (unless the session header names one): the client's `user`."""
        return self.user


class ChatCompletionRequest(OpenAIRequest):
    """`POST /v1/chat/completions` body."""

    messages: Annotated[Items[ChatMessage], Field(min_length=1)]


class CompletionRequest(OpenAIRequest):
    """`POST /v1/completions` body."""

    # `messages` would be read as the prompt (routing and a keyed request's worst case look for it first), and is
    # no field of a text completion: refused by name rather than forwarded.
    model_config = ConfigDict(json_schema_extra={"not": {"required": ["messages"]}})
    misplaced: ClassVar[dict[str, str]] = {
        "messages": "a text completion takes 'prompt'; 'messages' is for /v1/chat/completions."}

    prompt: StrictStr | Items[StrictStr] | Items[StrictInt] | Items[Items[StrictInt]]


def _not_true(value: bool) -> bool:
    if value:
        raise ValueError("must be false (not offered on this endpoint)")
    return value


#: `false` or absent, and nothing else (not `0`: pydantic's `Literal[False]` takes it, as `0 == False`).
OnlyFalse = Annotated[StrictBool, AfterValidator(_not_true), WithJsonSchema({"type": "boolean", "const": False})]

_POOLING_MISPLACED = {"messages": "'messages' is for /v1/chat/completions.",
                     "turnout": "pooling requests are not routed by a policy: name the model."}
# A text, or a multimodal content part or parts, as vLLM's scoring endpoints take them.
_ScoreInput = StrictStr | dict[str, Any] | Items[Any]


class EmbeddingRequest(OpenAIRequest):
    """`POST /v1/embeddings` body: sent to the pooling worker the model names (no policy chooses)."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["messages"]}})
    misplaced: ClassVar[dict[str, str]] = _POOLING_MISPLACED

    input: StrictStr | Annotated[Items[StrictStr], Field(min_length=1)] | Annotated[
        Items[StrictInt], Field(min_length=1)] | Annotated[Items[Items[StrictInt]], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: OnlyFalse | None = None


class RerankRequest(OpenAIRequest):
    """`POST /v1/rerank` body (vLLM's and Jina/Cohere's shape): documents ranked by relevance to the query."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["messages"]}})
    misplaced: ClassVar[dict[str, str]] = _POOLING_MISPLACED
    query: _ScoreInput
    documents: StrictStr | Annotated[Items[Any], Field(min_length=1)]
    top_n: Annotated[StrictInt, Field(ge=0)] | None = None
    stream: OnlyFalse | None = None


#: The pairs `POST /v1/score` takes (vLLM accepts each): the first side scored against the second.
SCORE_PAIRS = (("text_1", "text_2"), ("data_1", "data_2"), ("queries", "documents"), ("queries", "items"))


class ScoreRequest(OpenAIRequest):
    """`POST /v1/score` body (vLLM's): one pair of sides, e.g. `text_1` and `text_2`."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["messages"]}})
    misplaced: ClassVar[dict[str, str]] = _POOLING_MISPLACED
    text_1: _ScoreInput | None = None
    text_2: _ScoreInput | None = None
    data_1: _ScoreInput | None = None
    data_2: _ScoreInput | None = None
    queries: _ScoreInput | None = None
    documents: _ScoreInput | None = None
    items: _ScoreInput | None = None
    stream: OnlyFalse | None = None

    @model_validator(mode="after")
    def _one_pair(self) -> ScoreRequest:
        given = [(a, b) for a, b in SCORE_PAIRS if getattr(self, a) is not None and getattr(self, b) is not None]
        if not given:
            raise ValueError("give one pair to score: " + ", ".join(f"{a} and {b}" for a, b in SCORE_PAIRS))
        return self


class ResponseInputItem(_Open):
    """One item of a Responses request's `input`: a message (role and content, a string or parts), or another
    item type the worker understands (a tool call's output, ...)."""

    type: StrictStr | None = None
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: StrictStr | Items[TextPart] | None = None


class ResponsesRequest(OpenAIRequest):
    """`POST /v1/responses` body (OpenAI's Responses API). A request naming `previous_response_id` goes to the
    worker that holds that response, whatever the model says."""

    model_config = ConfigDict(json_schema_extra={"not": {"required": ["messages"]}})
    misplaced: ClassVar[dict[str, str]] = {"messages": "a Responses request takes 'input'; 'messages' is for "
                                                       "/v1/chat/completions and /v1/messages."}
    input: StrictStr | Annotated[Items[ResponseInputItem], Field(min_length=1)]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    previous_response_id: Annotated[StrictStr, Field(min_length=1)] | None = None
    store: StrictBool | None = None
    background: OnlyFalse | None = None  # background responses poll one worker's memory: not relayed


class AnthropicMessage(_Open):
    """A message of Anthropic's Messages API: the role and a string or content blocks."""

    role: Literal["user", "assistant"]
    content: StrictStr | Items[TextPart]


class AnthropicMetadata(_Open):
    """`metadata`: Anthropic's `user_id` is the conversation's session for affinity."""

    user_id: StrictStr | None = None


class MessagesRequest(OpenAIRequest):
    """`POST /v1/messages` body (Anthropic's Messages API, which vLLM serves)."""

    messages: Annotated[Items[AnthropicMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)]
    system: StrictStr | Items[TextPart] | None = None
    metadata: AnthropicMetadata | None = None
    stop_sequences: Items[StrictStr] | None = None

    def session(self) -> str | None:
        """The session affinity keeps: Anthropic's `metadata.user_id`."""
        return self.metadata.user_id if self.metadata is not None else None


class CountTokensRequest(OpenAIRequest):
    """`POST /v1/messages/count_tokens` body: what `/v1/messages` would take, without generating."""

    messages: Annotated[Items[AnthropicMessage], Field(min_length=1)]
    system: StrictStr | Items[TextPart] | None = None
    stream: OnlyFalse | None = None


def _is_union_tag(part: int | str) -> bool:
    """pydantic puts union member tags such as `str` or `list[TextPart]` into error locations."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or not part.isidentifier())


def validate_body(schema: type[OpenAIRequest], body: Any) -> OpenAIRequest:
    """Validate a decoded JSON body; a `GatewayError` 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise bad_request(f"Request body must be a JSON object, got {type(body).__name__}.")
    for name, why in schema.misplaced.items():
        if name in body:
            raise bad_request(f"Unexpected field '{name}': {why}", name)
    try:
        req = schema.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # Union members each report an error. Those saying the value is not of a member's type only say which
        # member it was not (content that is a list "should be a valid string"): when another error says what is
        # wrong inside the member it is, that one is meant. Then the shortest location is the field written.
        telling = [e for e in errors if not e["type"].endswith("_type")] or errors
        first = min(telling, key=lambda e: len(e["loc"]))
        loc = tuple(p for p in first["loc"] if not _is_union_tag(p))
        param = field_path(loc)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise bad_request(f"Invalid value for '{param}': {first['msg']}{more}", param) from None
    return req


def invalid_body(exc: ValidationError) -> GatewayError:
    """400 naming the first bad field of a small JSON body (feedback, a key's rules)."""
    first = exc.errors(include_url=False)[0]
    param = field_path(tuple(first["loc"])) or None
    return bad_request(f"Invalid value for '{param or 'body'}': {first['msg']}", param)


__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "GatewayError",
    "RouteOptions",
    "content_text",
    "invalid_body",
    "prompt_text",
    "validate_body",
]
