"""`turnout grade` on runs collected from two fake workers whose replies are scripted: reference graders, the LLM
judge (score and pairwise, unreadable verdicts as NaN, its cost counted, never paid twice), and a table that
the training commands read unchanged."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import pandas as pd
import pytest
from rich.console import Console

from routers.offline.dataset import load_table
from server.config import TurnoutConfig, parse_config
from server.fleet.caller import FleetCaller
from server.fleet.commands import CollectOptions, collect, grade_notes, grade_table
from server.fleet.grade import grade
from server.fleet.judge import Judge, check_rubric, parse_pairwise, parse_score
from server.fleet.run import RunDir
from tests.conftest import Upstream, fake_config

QUIET = Console(quiet=True)
QUESTIONS = [f"Question {i}: which option is right? (A) no (B) yes (C) maybe" for i in range(4)]


def script(fakes: dict[str, Upstream], model: str, reply: str) -> None:
    httpx.post(f"{fakes[model].root}/fake/mode", json={"reply": reply}, timeout=5).raise_for_status()


def requests_seen(fakes: dict[str, Upstream], model: str) -> int:
    return int(httpx.get(f"{fakes[model].root}/fake/stats", timeout=5).json()["requests"])


async def collected(fakes: dict[str, Upstream], tmp_path: Path) -> tuple[TurnoutConfig, RunDir]:
    """Four multiple-choice prompts (answer B) and one without a reference; small answers B, big answers C."""
    rows = [{"prompt": q, "reference": "B", "grader": "choice", "task": "mc"} for q in QUESTIONS]
    rows.append({"prompt": "Tell me a story.", "task": "open"})
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script(fakes, "fake-small", "The answer is (B).")
    script(fakes, "fake-big", "I would say (C).")
    cfg = parse_config(fake_config(fakes))
    await collect(cfg, CollectOptions(str(source), tmp_path / "run", max_tokens=5), QUIET)
    return cfg, RunDir(tmp_path / "run")


@pytest.mark.usefixtures("fake_reset")
async def test_reference_graders_write_a_table_that_training_reads(fakes: dict[str, Upstream],
                                                                  tmp_path: Path) -> None:
    _, run = await collected(fakes, tmp_path)
    report = await grade(run, "auto")
    assert report.no_reference == 2, "the story has no reference: unknown for both models, not 0"
    df = pd.read_parquet(report.table)
    mc = df[df.task == "mc"]
    assert (mc["score__fake-small"] == 1.0).all() and (mc["score__fake-big"] == 0.0).all()
    assert df[df.task == "open"][["score__fake-small", "score__fake-big"]].isna().all().all()
    answers = run.latest()
    for _, row in df.iterrows():
        assert row["cost_usd__fake-big"] == answers[(row.prompt_id, "fake-big")].cost_usd
    data = load_table(report.table)  # the format `turnout train` and `turnout eval` read
    assert data.models == ["fake-big", "fake-small"] and data.costs is not None
    assert len(data.prompts) == 4 and "dropped 1 rows whose every score is NaN" in data.notes
    assert report.mean_score == {"fake-small": 1.0, "fake-big": 0.0}


@pytest.mark.usefixtures("fake_reset")
async def test_the_judge_scores_counts_its_cost_and_never_pays_twice(fakes: dict[str, Upstream],
                                                                     tmp_path: Path) -> None:
    cfg, run = await collected(fakes, tmp_path)
    script(fakes, "fake-big", "Rating: 8")
    before = requests_seen(fakes, "fake-big")
    caller = FleetCaller(cfg)
    try:
        report = await grade(run, "judge", judge=Judge(caller, "fake-big"))
        assert requests_seen(fakes, "fake-big") - before == 10, "one verdict per answer"
        df = pd.read_parquet(report.table)
        assert (df["score__fake-small"] == 0.8).all() and (df["score__fake-big"] == 0.8).all()
        assert report.judge_cost_usd > 0 and report.unreadable == 0
        again = await grade(run, "judge", judge=Judge(caller, "fake-big"))
        assert requests_seen(fakes, "fake-big") - before == 10, "verdicts are kept: a rerun pays nothing"
        assert again.judge_cost_usd == pytest.approx(report.judge_cost_usd)
    finally:
        await caller.aclose()


@pytest.mark.usefixtures("fake_reset")
async def test_a_judge_that_answers_nonsense_gives_unknown_scores(fakes: dict[str, Upstream],
                                                                  tmp_path: Path) -> None:
    cfg, run = await collected(fakes, tmp_path)
    script(fakes, "fake-big", "I am not sure what you mean.")
    before = requests_seen(fakes, "fake-big")
    caller = FleetCaller(cfg)
    try:
        report = await grade(run, "judge", judge=Judge(caller, "fake-big", retries=2))
    finally:
        await caller.aclose()
    assert requests_seen(fakes, "fake-big") - before == 30, "each verdict asked three times"
    assert report.unreadable == 10 and report.judge_cost_usd > 0
    df = pd.read_parquet(report.table)
    assert df[["score__fake-small", "score__fake-big"]].isna().all().all(), "unknown, never 0"
    narrow = Console(width=40, record=True, file=io.StringIO())
    narrow.print(grade_table(report))
    narrow.print(grade_notes(report), soft_wrap=True)
    text = narrow.export_text()
    assert "10 unreadable judge verdicts" in text and f"judge cost ${report.judge_cost_usd:.6f}" in text, \
        "a narrow console never wraps the figures a script reads"


@pytest.mark.usefixtures("fake_reset")
async def test_pairwise_verdicts_against_a_reference_model(fakes: dict[str, Upstream], tmp_path: Path) -> None:
    cfg, run = await collected(fakes, tmp_path)
    script(fakes, "fake-big", "Verdict: B")
    caller = FleetCaller(cfg)
    try:
        report = await grade(run, "judge", judge=Judge(caller, "fake-big", kind="pairwise"),
                             reference_model="fake-big")
    finally:
        await caller.aclose()
    df = pd.read_parquet(report.table)
    assert (df["score__fake-small"] == 1.0).all(), "B (the graded answer) won every time"
    assert (df["score__fake-big"] == 0.5).all(), "the reference against itself is a tie"


def test_verdicts_are_read_strictly() -> None:
    assert parse_score("Rating: 7") == 0.7 and parse_score("rating=10") == 1.0
    assert parse_score("Rating: 11") is None and parse_score("7/10") is None
    assert parse_pairwise("Verdict: tie") == 0.5 and parse_pairwise("verdict: a") == 0.0
    assert parse_pairwise("B is better") is None


def test_a_rubric_must_show_the_answer_and_use_known_placeholders() -> None:
    check_rubric("Grade {answer} to {prompt}. Rating: {{0-10}}", "score")
    with pytest.raises(ValueError, match="answer"):
        check_rubric("Grade {prompt}", "score")
    with pytest.raises(ValueError, match="no placeholder"):
        check_rubric("Grade {answer} with {style}", "score")


@pytest.mark.usefixtures("fake_reset")
async def test_an_answer_a_grader_fails_on_is_unknown_and_counted(fakes: dict[str, Upstream],
                                                                  tmp_path: Path) -> None:
    """A boxed fraction too large to read would raise in the grader: that answer is NaN, the rest are graded."""
    source = tmp_path / "math.jsonl"
    source.write_text(json.dumps({"prompt": "1/3 of a big number?", "reference": "\\boxed{1}", "grader": "boxed"})
                      + "\n")
    script(fakes, "fake-small", "\\boxed{\\frac{" + "9" * 1000 + "}{3}}")
    script(fakes, "fake-big", "\\boxed{1}")
    cfg = parse_config(fake_config(fakes))
    await collect(cfg, CollectOptions(str(source), tmp_path / "run", max_tokens=5), QUIET)
    report = await grade(RunDir(tmp_path / "run"), "auto")
    df = pd.read_parquet(report.table)
    assert report.grader_errors == 1 and df["score__fake-small"].isna().all() and (df["score__fake-big"] == 1).all()

