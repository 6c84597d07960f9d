"""`turnout grade`: a collection run's answers scored into a routing table in the standard format (`prompt`,
`score__<model>`, `cost_usd__<model>`, `task`, `split`, and `logprob_mean__<model>` / `logprob_min__<model>`),
which `turnout train` and `turnout eval` read unchanged.

Scores come from reference graders (`routers.offline.graders`: each prompt's own grader with `auto`, or one
named for all) or from an LLM judge (`server.fleet.judge`). A call that failed, a prompt with no reference for
its grader, an unreadable verdict, or a code answer when running code was not allowed: each is unknown (NaN),
never 0, and counted in the report.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from routers.offline.code_grader import prompt_code_tests
from routers.offline.graders import CODE_GRADER, GraderFn, grader_for
from server.fleet.judge import Judge, Verdict, VerdictBook, as_score
from server.fleet.run import Answer, RunDir
from server.fleet.sources import PromptItem

AUTO, JUDGE = "auto", "judge"
log = logging.getLogger("turnout.grade")
Key = tuple[str, str]  # (prompt id, model)


@dataclass(slots=True)
class GradeReport:
    """What grading found: how many scores each model got, and why the others are unknown."""

    table: Path
    models: list[str]
    rows: int
    scored: dict[str, int] = field(default_factory=dict)
    failed_calls: dict[str, int] = field(default_factory=dict)
    no_reference: int = 0  # answers whose prompt has no reference (or no grader) to grade against
    code_not_run: int = 0  # code answers left ungraded: running model output was not allowed
    unreadable: int = 0  # judge verdicts that could not be read after every retry
    grader_errors: int = 0  # answers a reference grader failed on (logged)
    judge_cost_usd: float = 0.0
    mean_score: dict[str, float] = field(default_factory=dict)


def models_of(answers: dict[Key, Answer]) -> list[str]:
    """The run's models, by name (answers arrive in any order: the table's columns must not depend on it)."""
    return sorted({m for _, m in answers})


def reference_scores(prompts: list[PromptItem], answers: dict[Key, Answer], grader: str, allow_code: bool,
                     report: GradeReport) -> dict[Key, float]:
    """Scores by reference graders: `grader` for every prompt, or each prompt's own with `auto`."""
    fixed = None if grader == AUTO else grader_for(grader, allow_code=allow_code)
    jobs: list[tuple[Key, GraderFn, str, str]] = []
    for item in prompts:
        name = item.grader if grader == AUTO else grader
        for model in report.models:
            a = answers.get((item.prompt_id, model))
            if a is None or not a.ok:
                continue
            if not name or (item.reference is None and not name.startswith("regex:")):
                report.no_reference += 1
            elif name == CODE_GRADER and not allow_code:
                report.code_not_run += 1
            else:
                fn = fixed or grader_for(name, allow_code=allow_code)
                if name == CODE_GRADER:  # the prompt may be code the answer completes (HumanEval)
                    fn = functools.partial(prompt_code_tests, item.text)
                jobs.append(((item.prompt_id, model), fn, a.text or "", item.reference or ""))
    # One at a time, in this thread: the code grader starts a process with limits set between fork and exec,
    # which is not safe while other threads run.
    scores: dict[Key, float] = {}
    for key, fn, answer, reference in jobs:
        try:
            scores[key] = fn(answer, reference)
        except Exception:  # one odd answer (a number too large to read) is unknown; the grading goes on
            log.exception("grading %s's answer to %s failed; its score is unknown", key[1], key[0])
            report.grader_errors += 1
    return scores


async def judge_scores(prompts: list[PromptItem], answers: dict[Key, Answer], judge: Judge, book: VerdictBook,
                       reference_model: str | None, report: GradeReport, concurrency: int = 4) -> dict[Key, float]:
    """Scores by the LLM judge; verdicts already in `book` are reused (never paid for twice)."""
    known = book.load()
    slots = asyncio.Semaphore(concurrency)

    async def one(item: PromptItem, a: Answer) -> None:
        ref = answers.get((item.prompt_id, reference_model)) if reference_model else None
        if reference_model and (ref is None or not ref.ok):
            return  # nothing to compare against: unknown
        async with slots:
            verdict = await judge.judge(item, a, ref.text if ref is not None else None)
        book.append(verdict)
        known[(item.prompt_id, a.model)] = verdict

    todo = [(item, a) for item in prompts for m in report.models
            if (a := answers.get((item.prompt_id, m))) is not None and a.ok and (item.prompt_id, m) not in known
            and m != reference_model]
    await asyncio.gather(*(one(item, a) for item, a in todo))
    out: dict[Key, float] = {}
    for key, verdict in known.items():
        report.judge_cost_usd += verdict.cost_usd
        report.unreadable += verdict.score is None
        out[key] = as_score(verdict)
    if reference_model:  # the reference against itself: a tie
        out.update({(item.prompt_id, reference_model): 0.5 for item in prompts
                    if (a := answers.get((item.prompt_id, reference_model))) is not None and a.ok})
    return out


def write_table(prompts: list[PromptItem], answers: dict[Key, Answer], scores: dict[Key, float],
                report: GradeReport, keep_split: bool = True) -> None:
    """The routing table: one row per prompt, a score, cost and logprob column per model."""
    import pandas as pd  # the training stack: grading is an offline command

    rows: list[dict[str, object]] = []
    for item in prompts:
        row: dict[str, object] = {"prompt_id": item.prompt_id, "prompt": item.text, "task": item.task or "",
                                  "split": item.split or ""}
        for m in report.models:
            a = answers.get((item.prompt_id, m))
            answered = a is not None and a.ok
            row[f"score__{m}"] = scores.get((item.prompt_id, m), math.nan) if answered else math.nan
            row[f"cost_usd__{m}"] = a.cost_usd if answered and a is not None else math.nan
            row[f"logprob_mean__{m}"] = a.logprob_mean if a is not None and a.logprob_mean is not None else math.nan
            row[f"logprob_min__{m}"] = a.logprob_min if a is not None and a.logprob_min is not None else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    if not keep_split or not (df["split"] != "").all():
        df = df.drop(columns="split")  # no split for every prompt: `train` and `eval` split themselves (seeded)
    report.table.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.table.with_name(report.table.name + ".tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(report.table)  # whole or not at all
    for m in report.models:
        col = df[f"score__{m}"]
        report.scored[m] = int(col.notna().sum())
        report.mean_score[m] = float(col.mean()) if report.scored[m] else math.nan


async def grade(run: RunDir, grader: str, *, table: Path | None = None, allow_code: bool = False,
                judge: Judge | None = None, reference_model: str | None = None, keep_split: bool = True,
                on_progress: Callable[[str], None] = lambda _: None) -> GradeReport:
    """Grade `run` (see the module docstring) and write its table (default `RUN_DIR/table.parquet`). With
    `keep_split` False the source's split is left out, so training and evaluation split the table themselves (a
    small sample of the bundled suite holds few of its test prompts)."""
    prompts, answers = run.prompts(), run.latest()
    report = GradeReport(table or run.path / "table.parquet", models_of(answers), len(prompts))
    if not report.models:
        raise ValueError(f"{run.path}: no answers collected yet (run `turnout collect` first)")
    if reference_model is not None and reference_model not in report.models:
        raise ValueError(f"--pairwise-against {reference_model!r}: not a model of this run ({report.models})")
    for m in report.models:
        report.failed_calls[m] = sum(1 for (p, mm), a in answers.items() if mm == m and not a.ok)
    if grader == JUDGE:
        if judge is None:
            raise ValueError("--grader judge needs --judge MODEL (and --config)")
        on_progress(f"judging with {judge.model} ({judge.kind})")
        scores = await judge_scores(prompts, answers, judge, VerdictBook(run.path, judge, reference_model),
                                    reference_model, report)
    else:
        scores = reference_scores(prompts, answers, grader, allow_code, report)
    write_table(prompts, answers, scores, report, keep_split)
    return report


__all__ = ["AUTO", "JUDGE", "GradeReport", "Verdict", "grade"]
