"""Writing a benchmark's results: JSON for machines and markdown for people, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, data: dict[str, Any], markdown: str) -> None:
    """Write `out`.json and `out`.md (creating the folder) and print the markdown."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    print(markdown)
