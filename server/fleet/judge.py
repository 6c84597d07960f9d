"""An LLM judge: a configured model grades each collected answer with an editable rubric.

Two kinds of verdict:
- `score`: the rubric asks for a rating from 0 to 10; the score is rating / 10.
- `pairwise` (RouteLLM's labels): the rubric shows the reference model's answer as A and the graded model's as
  B and asks which is better; the score is 1 (B better), 0.5 (a tie) or 0 (A better). The reference model's
  own answers score 0.5.

A verdict that cannot be read is asked again (sampling, so the retry can differ) up to `retries` times, then
recorded as unknown (NaN), never as 0. Every judge call's cost is counted. Verdicts are appended to the run's
`judge-<model>.jsonl` as they arrive, so grading resumes where it stopped and never pays twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from server.fleet.caller import FleetCaller
from server.fleet.run import Answer
from server.fleet.sources import PromptItem

Kind = Literal["score", "pairwise"]

SCORE_RUBRIC = """You are grading an AI assistant's answer to a user's request.

[Request]
{prompt}
{reference}
[Answer]
{answer}

Rate the answer from 0 (wrong or useless) to 10 (correct, complete and helpful).
Reply with one line and nothing else: Rating: <a number from 0 to 10>"""

PAIRWISE_RUBRIC = """You are comparing two AI assistants' answers to the same user request.

[Request]
{prompt}

[Answer A]
{reference_answer}

[Answer B]
{answer}

Which answer is better? Reply with one line and nothing else: Verdict: A, Verdict: B or Verdict: tie"""

_RATING = re.compile(r"rating\s*[:=]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_VERDICT = re.compile(r"verdict\s*[:=]?\s*(a|b|tie)\b", re.IGNORECASE)


@dataclass(slots=True)
class Verdict:
    """One judged answer: its score (None: unreadable after every retry) and what judging it cost."""

    prompt_id: str
    model: str
    score: float | None
    cost_usd: float
    attempts: int
    raw: str | None = None  # the judge's last reply, for reading why a verdict was unreadable
    failed: bool = False  # no call reached an answer (the judge was down): judged again by the next run


def parse_score(reply: str) -> float | None:
    """A rubric rating of 0..10 as a score in [0, 1]; None when the reply holds none."""
    m = _RATING.search(reply)
    if m is None:
        return None
    rating = float(m.group(1))
    return rating / 10 if 0 <= rating <= 10 else None


def parse_pairwise(reply: str) -> float | None:
    """B's score against A: 1, 0.5 (tie) or 0; None when the reply names no verdict."""
    m = _VERDICT.search(reply)
    if m is None:
        return None
    return {"b": 1.0, "tie": 0.5, "a": 0.0}[m.group(1).lower()]


@dataclass(slots=True)
class Judge:
    """Grades answers with one configured model (see the module docstring)."""

    caller: FleetCaller
    model: str
    kind: Kind = "score"
    rubric: str | None = None
    retries: int = 2
    max_tokens: int = 16

    def __post_init__(self) -> None:
        if self.rubric is not None:
            check_rubric(self.rubric, self.kind)

    def prompt(self, item: PromptItem, answer: str, reference_answer: str | None) -> str:
        """The rubric filled in for one answer."""
        if self.kind == "pairwise":
            return (self.rubric or PAIRWISE_RUBRIC).format(prompt=item.text, answer=answer,
                                                            reference_answer=reference_answer or "")
        ref = f"\n[Reference answer]\n{item.reference}\n" if item.reference else ""
        return (self.rubric or SCORE_RUBRIC).format(prompt=item.text, answer=answer, reference=ref)

    async def judge(self, item: PromptItem, answer: Answer, reference_answer: str | None = None) -> Verdict:
        """The verdict on one answer (see the module docstring)."""
        parse = parse_pairwise if self.kind == "pairwise" else parse_score
        messages = [{"role": "user", "content": self.prompt(item, answer.text or "", reference_answer)}]
        cost, reply, answered = 0.0, None, False
        for attempt in range(1, self.retries + 2):
            sampling = {"temperature": 0.0} if attempt == 1 else {"temperature": 0.7, "seed": attempt}
            got = await self.caller.chat(item.prompt_id, self.model, messages, max_tokens=self.max_tokens,
                                         logprobs=False, sampling=sampling)
            cost += got.cost_usd or 0.0
            reply, answered = (got.text, True) if got.ok else (got.error, answered)
            score = parse(got.text) if got.ok and got.text is not None else None
            if score is not None:
                return Verdict(item.prompt_id, answer.model, score, cost, attempt, reply)
        return Verdict(item.prompt_id, answer.model, None, cost, self.retries + 1, reply, failed=not answered)


class VerdictBook:
    """The judge's verdicts of one run, appended as they arrive (`judge-<model>-<kind>.jsonl`)."""

    def __init__(self, run_path: Path, judge: Judge, reference_model: str | None = None) -> None:
        """One book per judge, kind, reference model and rubric: verdicts of another setting are not reused."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", judge.model)
        setting = f"{judge.kind}|{reference_model or ''}|{judge.rubric or ''}|{judge.max_tokens}"
        digest = hashlib.sha256(setting.encode()).hexdigest()[:10]
        self.path = run_path / f"judge-{safe}-{judge.kind}-{digest}.jsonl"

    def load(self) -> dict[tuple[str, str], Verdict]:
        """Every verdict recorded so far, by (prompt, graded model)."""
        out: dict[tuple[str, str], Verdict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    v = Verdict(**json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    continue  # a line cut short by a crash
                if not v.failed:  # a judge that was down is asked again
                    out[(v.prompt_id, v.model)] = v
        return out

    def append(self, verdict: Verdict) -> None:
        """Record one verdict durably (on a line of its own, even after a line a crash cut short)."""
        cut = self.path.is_file() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(("\n" if cut else "") + json.dumps(asdict(verdict)) + "\n")


def check_rubric(rubric: str, kind: Kind) -> None:
    """`ValueError` naming what is wrong with a custom rubric: it must show the answer, and its braces must be
    the placeholders (write a literal brace twice: `{{`)."""
    if "{answer}" not in rubric:
        raise ValueError("--rubric: it never shows the answer to grade ({answer} is missing)")
    try:
        rubric.format(prompt="", answer="", reference="", reference_answer="")
    except (KeyError, IndexError, ValueError) as exc:
        names = "{prompt}, {answer}, {reference_answer}" if kind == "pairwise" else "{prompt}, {reference}, {answer}"
        raise ValueError(f"--rubric: {exc!r} is no placeholder; use {names}, and {{{{ }}}} for a literal brace") \
            from None


def as_score(verdict: Verdict | None) -> float:
    """A verdict's score for the table: NaN when unknown."""
    return math.nan if verdict is None or verdict.score is None else verdict.score
