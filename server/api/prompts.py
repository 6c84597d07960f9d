"""The text a routing policy reads from a request. Kept free of heavy imports: the demo's replay workers
import it too, and start in under a second."""

from __future__ import annotations

from typing import Any

from server.upstream.content import content_text

__all__ = ["content_text", "prompt_text"]


def prompt_text(body: dict[str, Any]) -> str:
    """The text a policy sees: the last user message (chat, Anthropic messages, a Responses request's input
    items), a Responses request's input text, or the prompt (completions)."""
    messages = body.get("messages")
    if not isinstance(messages, list) and isinstance(body.get("input"), list):
        messages = body["input"]
    if isinstance(messages, list):
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role") == "user":
                return content_text(msg.get("content"))
        return ""
    if isinstance(body.get("input"), str):
        return str(body["input"])
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return str(prompt[0])
    return ""
