"""Reading the gateway's request log (`turnout.requests`, one JSON object a line, among other log lines)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def log_records(path: Path, key: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of the log file `path` (which must exist) that carry `key` ("request_id": requests,
    "feedback_for": feedback); other lines (other loggers, a line cut short) are skipped."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and key in row:
            yield row


def logged_messages(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A logged request's prompt as chat messages (a completion's prompt text as one user message); None when
    the prompt was not logged (`server.log_prompts` off)."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return prompt
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return None
