"""Request limits past the schema: how many messages, how long each, how many tokens and answers a client may
ask for (`server.max_*`). The body size is checked while it is read (`server.api.body.read_body`); types and
ranges by the schema (`server.api.protocol`). Each limit passed is a 400 naming the field, before any routing."""

from __future__ import annotations

from typing import Any

from server.api.prompts import content_text
from server.config import ServerConfig
from server.errors import bad_request


def check_limits(body: dict[str, Any], srv: ServerConfig) -> None:
    """Raise a 400 for the first limit `body` (already schema-valid) passes."""
    for name in ("messages", "input"):  # chat's and Anthropic's messages, a Responses request's input items
        items = body.get(name)
        if not isinstance(items, list) or (name == "input" and not all(isinstance(m, dict) for m in items)):
            continue  # an embedding's list of texts is not a conversation
        if len(items) > srv.max_messages:
            raise bad_request(f"'{name}' has {len(items)} items; at most {srv.max_messages} are accepted.", name)
        for i, msg in enumerate(items):
            chars = len(content_text(msg.get("content"))) if isinstance(msg, dict) else 0
            if chars > srv.max_message_chars:
                raise bad_request(f"'{name}[{i}].content' is {chars} characters long; at most "
                                  f"{srv.max_message_chars} are accepted.", f"{name}[{i}].content")
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and value > srv.max_output_tokens:
            raise bad_request(f"'{field}' is {value}; at most {srv.max_output_tokens} are accepted.", field)
    n = body.get("n")
    if isinstance(n, int) and n > srv.max_n:
        raise bad_request(f"'n' is {n}; at most {srv.max_n} answers per request are accepted.", "n")
