"""The prefill study's markdown report, from its JSON."""

from __future__ import annotations

from typing import Any


def render(report: dict[str, Any]) -> str:
    """Placeholder until the full report is written."""
    return "# prefill study\n"
