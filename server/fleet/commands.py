"""The `turnout collect` and `turnout grade` commands: prompts in, every chosen model's answers out, with a
plan, a price, a cap, a progress bar and a summary, resumable (see `server.fleet.run`); then the answers
scored into a routing table (see `server.fleet.grade`)."""

from __future__ import annotations

import asyncio
import math
import signal
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from server.config import TurnoutConfig, load_config
from server.fleet.caller import FleetCaller
from server.fleet.collect import CollectError, Collector, Job, Tally, check_cap, check_models, plan
from server.fleet.grade import AUTO, JUDGE, GradeReport, grade
from server.fleet.judge import Judge
from server.fleet.replay import ReplayReport
from server.fleet.run import Answer, RunDir
from server.fleet.sources import PromptItem, read_source


@dataclass(frozen=True, slots=True)
class CollectOptions:
    """What `turnout collect` was asked for."""

    source: str
    out: Path
    models: list[str] | None = None  # None: every model the config serves
    sample: int | None = None
    seed: int = 0
    max_tokens: int = 256
    max_cost_usd: float | None = None
    concurrency: int = 4
    temperature: float = 0.0
    partial: bool = False  # a cap below the estimate: collect what it buys instead of refusing
    tasks: list[str] | None = None  # keep only the source's prompts of these tasks (before sampling)


def _settings(opts: CollectOptions) -> dict[str, object]:
    """What a rerun must agree with (the models may grow; the cap and concurrency may change)."""
    return {"source": opts.source, "sample": opts.sample, "seed": opts.seed, "max_tokens": opts.max_tokens,
            "temperature": opts.temperature, "tasks": opts.tasks}


def _prompts(run: RunDir, opts: CollectOptions) -> list[PromptItem]:
    """The run's prompts: those it was started with (`CollectError` when a rerun asks for another run), or
    the source's for a new run."""
    if not run.exists():
        return read_source(opts.source, sample=opts.sample, seed=opts.seed, tasks=opts.tasks)
    before = run.settings()
    changed = {k: (before.get(k), v) for k, v in _settings(opts).items() if before.get(k) != v}
    if changed:
        raise CollectError(f"{opts.out} holds a run of other settings {changed} (was, now): use another --out")
    return run.prompts()


async def collect(config: TurnoutConfig, opts: CollectOptions, console: Console) -> Tally:
    """Run `turnout collect` (see the module docstring)."""
    caller = FleetCaller(config)
    try:
        models = list(dict.fromkeys(opts.models or caller.registry.models()))
        check_models(models, caller.targets())
        run = RunDir(opts.out)
        prompts = _prompts(run, opts)
        latest = run.latest()
        done = {key for key, a in latest.items() if a.ok}
        spent = sum(a.cost_usd or 0.0 for a in run.answers())
        prices = {m: caller.registry.resolve(m)[0].config.price for m in models}
        jobs = plan(prompts, models, done, prices, opts.max_tokens)
        estimate = sum(j.estimate_usd for j in jobs)
        console.print(f"{len(jobs)} calls to make ({len(done)} done before), estimated ${estimate:.6f}, at most "
                      f"${sum(j.worst_usd for j in jobs):.6f}; spent so far ${spent:.6f}")
        check_cap(jobs, opts.max_cost_usd, spent, opts.partial)
        if not run.exists():  # only now: a source, model or cap refused above leaves no run behind
            run.start(_settings(opts), prompts)
        console.print(f"{opts.out}: {len(prompts)} prompts x {len(models)} models")
        return await _run(caller, run, jobs, opts, spent, console)
    finally:
        await caller.aclose()


async def _run(caller: FleetCaller, run: RunDir, jobs: list[Job], opts: CollectOptions, spent: float,
               console: Console) -> Tally:
    writer = run.appender()
    progress = Progress(TextColumn("collecting"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]:.2f} calls/s"), TimeRemainingColumn(),
                        TextColumn("spent ${task.fields[spent]:.6f}, {task.fields[failed]} failed"),
                        console=console, transient=False)
    task = progress.add_task("collect", total=len(jobs), rate=0.0, spent=spent, failed=0)
    loop = asyncio.get_running_loop()
    started = loop.time()

    def on_answer(t: Tally) -> None:
        progress.update(task, completed=t.done, spent=t.spent_usd, failed=t.failed,
                        rate=t.done / max(1e-9, loop.time() - started))

    collector = Collector(caller, writer, opts.max_tokens, opts.concurrency, opts.max_cost_usd,
                          {"temperature": opts.temperature}, on_answer)

    def on_sigint() -> None:
        if collector.stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C abandons the calls in flight
        collector.stop.set()
        console.print("stopping: waiting for the calls in flight (Ctrl-C again to abandon them)")

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        with progress:
            return await collector.run(jobs, spent)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        writer.close()


def summary(run: RunDir) -> Table:
    """Per model: answers, failures, tokens, cost, latency and time to first token over the whole run."""
    table = Table("model", "answers", "failed", "prompt tokens", "completion tokens", "cost USD", "latency s p50",
                  "ttft s p50", title=f"collected in {run.path}")
    by_model: dict[str, list[Answer]] = {}
    for a in run.latest().values():
        by_model.setdefault(a.model, []).append(a)
    for model, answers in sorted(by_model.items()):
        ok = [a for a in answers if a.ok]
        table.add_row(model, str(len(ok)), str(len(answers) - len(ok)),
                      str(sum(a.prompt_tokens or 0 for a in ok)), str(sum(a.completion_tokens or 0 for a in ok)),
                      f"{sum(a.cost_usd or 0.0 for a in answers):.6f}", _median([a.latency_s for a in ok]),
                      _median([a.ttft_s for a in ok]))
    return table


def _median(values: list[float | None]) -> str:
    known = sorted(v for v in values if v is not None)
    return f"{known[len(known) // 2]:.3f}" if known else "-"


@dataclass(frozen=True, slots=True)
class GradeOptions:
    """What `turnout grade` was asked for."""

    run_dir: Path
    grader: str = AUTO
    allow_code: bool = False
    config: Path | None = None
    judge: str | None = None
    pairwise_against: str | None = None
    rubric: Path | None = None
    out: Path | None = None
    keep_split: bool = True
    retries: int = 2  # the judge's, for unreadable verdicts


async def run_grade(opts: GradeOptions, console: Console) -> GradeReport:
    """Run `turnout grade` and print its report."""
    run = RunDir(opts.run_dir)
    if not run.exists():
        raise ValueError(f"{opts.run_dir}: not a run directory of `turnout collect`")
    judge = None
    caller = None
    if opts.grader == JUDGE:
        if opts.config is None or opts.judge is None:
            raise ValueError("--grader judge needs --config CONFIG and --judge MODEL")
        caller = FleetCaller(load_config(opts.config))
        check_models([opts.judge], caller.targets())
        judge = Judge(caller, opts.judge, "pairwise" if opts.pairwise_against else "score",
                      opts.rubric.read_text(encoding="utf-8") if opts.rubric else None, opts.retries)
    try:
        report = await grade(run, opts.grader, table=opts.out, allow_code=opts.allow_code, judge=judge,
                             reference_model=opts.pairwise_against, keep_split=opts.keep_split,
                             on_progress=console.print)
    finally:
        if caller is not None:
            await caller.aclose()
    console.print(grade_table(report))
    # Printed apart from the table so that a narrow table never wraps the figures mid-phrase.
    console.print(grade_notes(report), soft_wrap=True)
    return report


def grade_table(report: GradeReport) -> Table:
    """The grading report: per model, how many answers were scored, failed calls and the mean score."""
    table = Table("model", "scored", "failed calls", "mean score", title=f"{report.table} ({report.rows} prompts)")
    for m in report.models:
        mean = report.mean_score.get(m, math.nan)
        table.add_row(m, str(report.scored.get(m, 0)), str(report.failed_calls.get(m, 0)),
                      "-" if math.isnan(mean) else f"{mean:.3f}")
    return table


def grade_notes(report: GradeReport) -> str:
    """One line under the grading table: why the unscored answers are unknown, and what the judge cost."""
    notes = [f"{report.no_reference} answers without a reference to grade against",
             f"{report.code_not_run} code answers not run (pass --allow-code)",
             f"{report.unreadable} unreadable judge verdicts", f"{report.grader_errors} grader failures"]
    return "; ".join(notes) + f" (all unknown, never 0); judge cost ${report.judge_cost_usd:.6f}"


def replay_table(report: ReplayReport) -> Table:
    """The replay report: the two routing mixes, then predicted quality and cost side by side."""
    data = report.as_json()
    table = Table("", "served", f"candidate {report.policy}",
                  title=f"{report.requests} logged requests replayed ({report.skipped} without a prompt or answer)")
    for model in sorted(set(report.served_mix) | set(report.candidate_mix)):
        table.add_row(model, str(report.served_mix[model]), str(report.candidate_mix[model]))

    def num(v: object, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    table.add_row("predicted quality", num(data["predicted_quality_served"], ".3f"),
                  num(data["predicted_quality_candidate"], ".3f"))
    table.add_row("cost USD (served: real; candidate: predicted)", f"{report.served_cost_usd:.6f}",
                  f"{report.candidate_cost_usd:.6f}")
    table.caption = (f"agreement {num(data['agreement'], '.1%')}; {report.not_a_candidate} requests were served by "
                     "a model the candidate cannot choose")
    return table
