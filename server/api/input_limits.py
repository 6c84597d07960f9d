"""Request limits past the schema: how many messages and content parts, how long each message, how many tokens
and answers a client may ask for (`server.max_*`). The body size is checked while it is read
(`server.api.body.read_body`); types and ranges by the schema (`server.api.protocol`). Each limit passed is a 400
naming the field, before any routing. The counts (`check_counts`) come before the schema: validating costs per
item, so an unbounded list would cost the gateway unbounded CPU before it could be refused."""

from __future__ import annotations

from typing import Any

from server.api.prompts import content_text
from server.config import ServerConfig
from server.errors import bad_request


def check_counts(body: Any, srv: ServerConfig) -> None:
    """Raise a 400 when a decoded body (not yet validated) has more messages than `server.max_messages` or more
    content parts in all than `server.max_content_parts`. Only lengths are read: cheap whatever the body."""
    if not isinstance(body, dict):
        return  # the schema says what is wrong with it
    parts = len(body["system"]) if isinstance(body.get("system"), list) else 0  # Anthropic's system blocks
    for name in ("messages", "input"):  # chat's and Anthropic's messages, a Responses request's input items
        items = body.get(name)
        if not isinstance(items, list) or (name == "input" and items and not isinstance(items[0], dict)):
            continue  # an embedding's list of texts or tokens is not a conversation
        if len(items) > srv.max_messages:
            raise bad_request(f"'{name}' has {len(items)} items; at most {srv.max_messages} are accepted.", name)
        parts += sum(len(m["content"]) for m in items if isinstance(m, dict) and isinstance(m.get("content"), list))
    if parts > srv.max_content_parts:
        raise bad_request(f"The request has {parts} content parts in all; at most {srv.max_content_parts} are "
                          "accepted.", "messages" if "messages" in body else "input")


def check_limits(body: dict[str, Any], srv: ServerConfig) -> None:
    """Raise a 400 for the first limit `body` (already schema-valid) passes."""
    for name in ("messages", "input"):  # chat's and Anthropic's messages, a Responses request's input items
        items = body.get(name)
        if not isinstance(items, list) or (name == "input" and not all(isinstance(m, dict) for m in items)):
            continue  # an embedding's list of texts is not a conversation
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
