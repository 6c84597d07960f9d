"""Where `turnout collect` takes its prompts from: a file of the user's own, the gateway's request log, or the
bundled evaluation suite (`bundled:llmrouter`, the bundled table's prompts with their ground truths).

Every source comes out as `PromptItem`s with stable ids, so a run can be resumed and a model added later.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from routers.offline.graders import METRIC_GRADERS
from server.fleet.request_log import log_records, logged_messages

BUNDLED = "bundled:llmrouter"
LOG_PREFIX = "log:"
BUNDLED_TABLE = Path(__file__).resolve().parents[2] / "data" / "llmrouter_9model" / "data.parquet"
_NO_OPTIONS = "its prompts hold no answer options, while the reference is an option letter"
#: Bundled tasks left out of the suite: the table keeps only part of what their original prompts held, so an
#: answer to the prompt as sent cannot be graded against the reference.
UNGRADABLE_BUNDLED = {
    **dict.fromkeys(("mmlu", "gpqa", "arc_challenge", "commonsense_qa", "openbook_qa", "agentverse-logicgrid"),
                    _NO_OPTIONS),
    "mbpp": "its prompts do not name the function its tests call",
    "commongen": "its prompt is the concept list itself, so echoing it scores full coverage",
}


class SourceError(ValueError):
    """A prompt source that cannot be used; the message names the file and every problem found."""


@dataclass(frozen=True, slots=True)
class PromptItem:
    """One prompt to send to every model: chat messages, the text a router reads (the last user message), and
    what grading may use (a reference answer, the grader that fits it, the task)."""

    prompt_id: str
    messages: tuple[dict[str, Any], ...]
    text: str
    reference: str | None = None
    grader: str | None = None
    task: str | None = None
    split: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The item as one line of the run's `prompts.jsonl`."""
        return {"prompt_id": self.prompt_id, "messages": list(self.messages), "text": self.text,
                "reference": self.reference, "grader": self.grader, "task": self.task, "split": self.split}

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> PromptItem:
        """The item of a `prompts.jsonl` line (as `to_json` wrote it)."""
        return cls(str(row["prompt_id"]), tuple(row["messages"]), str(row["text"]), row.get("reference"),
                   row.get("grader"), row.get("task"), row.get("split"))


def prompt_id_of(messages: list[dict[str, Any]]) -> str:
    """A stable id for a prompt without one: a digest of its messages."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg.get("role") == "user" and isinstance(msg.get("content"), str):
            return str(msg["content"])
    return ""


def item_from_record(row: dict[str, Any], where: str, problems: list[str]) -> PromptItem | None:
    """A prompt from one record with `prompt` (text) or `messages` (chat), and the optional fields."""
    if not isinstance(row, dict):
        problems.append(f"{where}: not a JSON object")
        return None
    messages: Any = row.get("messages")
    if hasattr(messages, "tolist"):
        messages = messages.tolist()  # parquet gives a list column as an array
    if isinstance(messages, str) and messages.strip().startswith("["):
        try:
            messages = json.loads(messages)  # CSV cells carry messages as JSON text
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: `messages` is not JSON ({exc.msg})")
            return None
    prompt = row.get("prompt")
    if messages is None and isinstance(prompt, str) and prompt.strip():
        messages = [{"role": "user", "content": prompt}]
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        problems.append(f"{where}: no `prompt` text or `messages` list")
        return None
    text = _last_user_text(messages)
    if not text:
        problems.append(f"{where}: no user message with text")
        return None

    def opt(name: str) -> str | None:
        value = row.get(name)
        if value is None or (isinstance(value, float) and value != value) or value == "":
            return None  # absent, NaN, or a blank CSV cell: unknown, never graded as an empty reference
        return value if isinstance(value, str) else json.dumps(value.tolist() if hasattr(value, "tolist") else value)

    return PromptItem(opt("prompt_id") or prompt_id_of(messages), tuple(messages), text, opt("reference"),
                      opt("grader"), opt("task"), opt("split"))


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of a JSONL, CSV or parquet file, each with where it is (for messages)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    yield f"{path.name} line {n}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path.name} line {n}: not JSON ({exc.msg})") from None
        return
    if suffix not in (".csv", ".parquet"):
        raise SourceError(f"{path.name}: expected a .jsonl, .csv or .parquet file of prompts")
    import pandas as pd  # the training stack: collecting is an offline command

    df = pd.read_csv(path, dtype=str, keep_default_na=False) if suffix == ".csv" else pd.read_parquet(path)
    for n, row in enumerate(df.to_dict(orient="records")):
        yield f"{path.name} row {n}", {str(k): v for k, v in row.items()}


def read_file(path: Path) -> list[PromptItem]:
    """Prompts of a JSONL, CSV or parquet file; `SourceError` listing every bad record."""
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    problems: list[str] = []
    items = [item for where, row in _records(path) if (item := item_from_record(row, where, problems)) is not None]
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise SourceError("; ".join(problems[:20]) + more)
    if not items:
        raise SourceError(f"{path.name}: no prompts in it")
    return items


def read_request_log(path: Path) -> list[PromptItem]:
    """Prompts from the gateway's request log (JSON lines of `turnout.requests`), deduplicated. Prompts are
    there only when the operator turned `server.log_prompts` on."""
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    items: dict[str, PromptItem] = {}
    lines = 0
    for row in log_records(path, "request_id"):
        lines += 1
        messages = logged_messages(row)
        item = item_from_record({"messages": messages}, "log", []) if messages else None
        if item is not None:
            items.setdefault(item.prompt_id, item)
    if not items:
        raise SourceError(f"{path.name}: {lines} request lines, none with a prompt (turn server.log_prompts on "
                          "to log them)")
    return list(items.values())


def read_bundled(table: Path = BUNDLED_TABLE, tasks: list[str] | None = None) -> list[PromptItem]:
    """The bundled table's prompts with their ground truths, the grader each task's metric calls for, the task
    and the split: a ready-made evaluation suite for any fleet (the tasks that can be graded as sent, see
    `UNGRADABLE_BUNDLED`)."""
    import pandas as pd

    for task in sorted(set(tasks or ()) & set(UNGRADABLE_BUNDLED)):
        raise SourceError(f"{BUNDLED}: task {task} is left out of the suite: {UNGRADABLE_BUNDLED[task]}")
    df = pd.read_parquet(table, columns=["prompt_id", "task", "split", "prompt", "metric", "ground_truth"])
    df = df[~df["task"].isin(list(UNGRADABLE_BUNDLED))]
    return [PromptItem(str(r.prompt_id), ({"role": "user", "content": str(r.prompt)},), str(r.prompt),
                       str(r.ground_truth), METRIC_GRADERS.get(str(r.metric)), str(r.task), str(r.split))
            for r in df.itertuples(index=False)]


def read_source(spec: str, *, sample: int | None = None, seed: int = 0,
                tasks: list[str] | None = None) -> list[PromptItem]:
    """The prompts of `spec` (`bundled:llmrouter`, `log:PATH` or a file path), only those of `tasks` when given,
    at most `sample` of them chosen at random with `seed` (kept in the source's order), duplicates by id
    dropped."""
    if sample is not None and sample < 1:
        raise SourceError(f"--sample {sample}: a number of prompts, at least 1")
    if spec == BUNDLED:
        items = read_bundled(tasks=tasks)
    elif spec.startswith(LOG_PREFIX):
        items = read_request_log(Path(spec[len(LOG_PREFIX):]))
    else:
        items = read_file(Path(spec))
    if tasks is not None:
        known = {item.task for item in items}
        unknown = sorted(set(tasks) - known)
        if unknown:
            raise SourceError(f"{spec}: no prompts of tasks {unknown} (its tasks: {sorted(str(t) for t in known)})")
        items = [item for item in items if item.task in tasks]
    unique = list({item.prompt_id: item for item in items}.values())
    if sample is not None and sample < len(unique):
        keep = sorted(random.Random(seed).sample(range(len(unique)), sample))
        unique = [unique[i] for i in keep]
    return unique
