"""OpenAI request schemas, used to validate what the gateway relies on and to name the bad field.

Validation is deliberately partial: known fields are type-checked, unknown fields (vLLM's extra
sampling parameters, future OpenAI fields) are allowed and forwarded untouched, because the gateway
forwards the client's own JSON, not a re-serialised model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from server.config import field_path
from server.errors import GatewayError, bad_request
from server.prompts import content_text, prompt_text


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    """One part of a multi-part message content (text, or another type the worker understands)."""

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
    content: StrictStr | list[TextPart] | None = None


class StreamOptions(_Open):
    """`stream_options`; the gateway always asks the worker for usage."""

    include_usage: StrictBool | None = None


class RouteOptions(BaseModel):
    """The `turnout` body field (the `openai` SDK's `extra_body`): per-request routing choices."""

    model_config = ConfigDict(extra="forbid")

    policy: StrictStr | None = Field(default=None, min_length=1)
    max_cost_usd: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] | None = None
    min_quality: Annotated[float, Field(strict=True, ge=0, le=1)] | None = None
    candidates: list[StrictStr] | None = Field(default=None, min_length=1)


class OpenAIRequest(_Open):
    """What chat and text completion requests share: model, sampling, streaming, and Turnout's own field."""

    model: StrictStr = Field(min_length=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    temperature: Annotated[float, Field(strict=True, ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(strict=True, gt=0, le=1)] | None = None
    user: StrictStr | None = None
    turnout: RouteOptions | None = None


class ChatCompletionRequest(OpenAIRequest):
    """`POST /v1/chat/completions` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None


class CompletionRequest(OpenAIRequest):
    """`POST /v1/completions` body."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


def _is_union_tag(part: int | str) -> bool:
    """pydantic puts union member tags such as `str` or `list[TextPart]` into error locations."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or not part.isidentifier())


def validate_body(schema: type[OpenAIRequest], body: Any) -> OpenAIRequest:
    """Validate a decoded JSON body; a `GatewayError` 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise bad_request(f"Request body must be a JSON object, got {type(body).__name__}.")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # Union members each report an error; the shortest location is the field the client wrote.
        first = min(errors, key=lambda e: len(e["loc"]))
        loc = tuple(p for p in first["loc"] if not _is_union_tag(p))
        param = field_path(loc)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise bad_request(f"Invalid value for '{param}': {first['msg']}{more}", param) from None


__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "GatewayError",
    "RouteOptions",
    "content_text",
    "prompt_text",
    "validate_body",
]
