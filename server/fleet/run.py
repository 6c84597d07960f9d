"""A collection run's directory: what was asked, and every answer as it arrived.

- `run.json`: the source, sample, seed and max_tokens the run was started with (a rerun must agree);
- `prompts.jsonl`: the run's prompts, written once (atomically) when the run starts;
- `answers.jsonl`: one JSON line per finished call, appended and flushed as each arrives. A call that failed is
  recorded with its error and tried again by the next run; a line cut short by a crash is ignored.

So a run can be stopped at any moment (Ctrl-C, a crash) and resumed: a rerun sends only the calls with no
answer yet, and a model added later gets only its own calls.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from server.fleet.sources import PromptItem

RUN_FILE, PROMPTS_FILE, ANSWERS_FILE = "run.json", "prompts.jsonl", "answers.jsonl"


@dataclass(slots=True)
class Answer:
    """One call's result: the answer and what it cost, or why it failed (a failure is never a score)."""

    prompt_id: str
    model: str  # the target asked for (a model or worker name of the config)
    worker: str | None = None
    text: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    finish_reason: str | None = None
    logprob_mean: float | None = None
    logprob_min: float | None = None
    error: str | None = None
    # The stream began but no usage came back: the worker may have generated tokens nobody reported, so the
    # collection charges the call's worst case (in `cost_usd`) rather than nothing.
    unmetered: bool = False

    @property
    def ok(self) -> bool:
        """Whether the call produced an answer."""
        return self.error is None and self.text is not None


class RunDir:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        """Whether a run was started here."""
        return (self.path / RUN_FILE).is_file()

    def settings(self) -> dict[str, Any]:
        """What the run was started with."""
        data: dict[str, Any] = json.loads((self.path / RUN_FILE).read_text(encoding="utf-8"))
        return data

    def start(self, settings: dict[str, Any], prompts: list[PromptItem]) -> None:
        """Write the run's settings and prompts (each file whole or not at all)."""
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path / PROMPTS_FILE, "".join(json.dumps(p.to_json()) + "\n" for p in prompts))
        _write_atomically(self.path / RUN_FILE, json.dumps(settings, indent=2) + "\n")

    def prompts(self) -> list[PromptItem]:
        """The run's prompts."""
        lines = (self.path / PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
        return [PromptItem.from_json(json.loads(line)) for line in lines if line.strip()]

    def answers(self) -> Iterator[Answer]:
        """Every recorded call in order (a line cut short by a crash is skipped)."""
        path = self.path / ANSWERS_FILE
        if not path.is_file():
            return
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a run killed mid-write
                yield Answer(**row)

    def latest(self) -> dict[tuple[str, str], Answer]:
        """The last recorded result of each (prompt, model): an answer once one succeeded."""
        out: dict[tuple[str, str], Answer] = {}
        for a in self.answers():
            key = (a.prompt_id, a.model)
            if key not in out or not out[key].ok:
                out[key] = a
        return out

    def appender(self) -> AnswerWriter:
        """A writer that appends answers to this run as they arrive."""
        return AnswerWriter(self.path / ANSWERS_FILE)


class AnswerWriter:
    """Appends one JSON line per answer and flushes it at once, so a crash loses only calls still in flight."""

    def __init__(self, path: Path) -> None:
        self._f: TextIO = path.open("a", encoding="utf-8")
        if self._f.tell() > 0:
            self._mend_cut_line(path)

    def _mend_cut_line(self, path: Path) -> None:
        """A run killed mid-write leaves a last line without its newline: end it, so the next record starts on
        a line of its own (the cut line itself is skipped when read)."""
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                self._f.write("\n")

    def write(self, answer: Answer) -> None:
        """Record one answer durably."""
        self._f.write(json.dumps(asdict(answer)) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        """Close the file."""
        self._f.close()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
