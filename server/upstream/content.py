"""How a message's content carries text in the APIs the gateway relays. Free of imports: the demo's replay
workers read prompts with it and start in under a second."""

from __future__ import annotations

from typing import Any

#: The content part types that carry text: chat's and Anthropic's `text`, the Responses API's `input_text`.
TEXT_PARTS = ("text", "input_text")


def content_text(content: Any) -> str:
    """Plain text of a message content (a string or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and p.get("type") in TEXT_PARTS and isinstance(p.get("text"), str))
    return ""
