"""`turnout train` and `turnout eval` on small tables, with the real ONNX embedder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from routers.artifacts import ArtifactError, load_artifact
from server.cli import app

TOPICS = {
    "math": ["What is {a} plus {b}?", "Compute {a} times {b}.", "Solve {a} x = {b} for x."],
    "geo": ["What is the capital of country number {a}?", "Which river flows through city {b}?",
            "Name a mountain range near region {a}."],
}


def table(n: int = 120, models: int = 3) -> pd.DataFrame:
    """Math prompts are solved only by the big model; geography prompts by every model."""
    rng = np.random.default_rng(0)
    rows: list[dict[str, str | float]] = []
    for i in range(n):
        topic = "math" if i % 2 else "geo"
        prompt = TOPICS[topic][i % 3].format(a=int(rng.integers(1, 999)), b=int(rng.integers(1, 999)))
        row: dict[str, str | float] = {"prompt": prompt, "task": topic, "split": "test" if i % 5 == 0 else "train"}
        for j in range(models):
            row[f"score__m{j}"] = 1.0 if topic == "geo" or j == models - 1 else 0.0
            row[f"cost_usd__m{j}"] = 10.0 ** (j - 5)
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TURNOUT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_train_then_load(cache: Path) -> None:
    path = cache / "t.csv"
    table().to_csv(path, index=False)
    res = CliRunner().invoke(app, ["train", "--data", str(path), "--router", "cost_aware", "--out",
                                   str(cache / "art"), "--embedder", "onnx"])
    assert res.exit_code == 0, res.output
    art = load_artifact(cache / "art", embedder_id="all-MiniLM-L6-v2-onnx-int8", models=["m0", "m1", "m2"])
    assert art.router == "cost_aware" and art.meta["rows"] == 96
    with pytest.raises(ArtifactError, match="embedder"):
        load_artifact(cache / "art", embedder_id="st:other-model")


def test_eval_writes_report_and_plots(cache: Path) -> None:
    path = cache / "t.parquet"
    table().to_parquet(path)
    out = cache / "r.json"
    res = CliRunner().invoke(app, ["eval", "--data", str(path), "--json", str(out), "--plot",
                                   str(cache / "p.png"), "--online", "--embedder", "onnx"])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert set(rep["best_single"]) == {"model", "quality", "cost"} and set(rep["oracle"]) >= {"quality", "cost"}
    for name in ("knn", "cost_aware", "bandit"):
        r = rep["routers"][name]
        assert {"aiq", "quality_at_best_single_cost", "cost_to_best_single_quality", "oracle_gap_share",
                "curve"} <= set(r)
    # The topics are trivially separable: the learned routers match the oracle's quality at less cost.
    assert rep["routers"]["cost_aware"]["quality_at_best_single_cost"] == pytest.approx(1.0)
    assert rep["routers"]["cost_aware"]["cost_to_best_single_quality"] < 0.7
    assert (cache / "p.png").stat().st_size > 0 and (cache / "p-regret.png").stat().st_size > 0
    assert rep["groups"]["all"]["online"]["steps"] == 24


def test_two_model_table_gets_apgr(cache: Path) -> None:
    df = table(models=2).drop(columns=["split", "cost_usd__m0", "cost_usd__m1"])
    path = cache / "two.jsonl"
    df.to_json(path, orient="records", lines=True)
    out = cache / "r.json"
    res = CliRunner().invoke(app, ["eval", "--data", str(path), "--router", "knn", "--json", str(out),
                                   "--plot", str(cache / "pgr.png")])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())["routers"]["knn"]
    # Half the prompts need the strong model: a perfect router's PGR rises linearly to 1 at a 50% strong
    # share, so its APGR (the mean over shares) is 0.75 and it recovers half the gap at a 25% share.
    assert r["apgr"] == pytest.approx(0.75, abs=0.02)
    assert r["cpt50"] == pytest.approx(0.25, abs=0.03)
    assert (cache / "pgr.png").exists()


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda df: df.drop(columns=["prompt"]), "prompt"),
        (lambda df: df.drop(columns=["score__m1", "score__m2", "cost_usd__m1", "cost_usd__m2"]), "score__"),
        (lambda df: df.assign(score__m1=["x"] * len(df)), "score__m1"),
        (lambda df: df.assign(score__m0=[1.5] * len(df)), "score__m0"),
    ],
)
def test_bad_tables_are_refused_and_nothing_is_written(cache: Path, mutate, fragment: str) -> None:  # type: ignore[no-untyped-def]
    path = cache / "bad.csv"
    mutate(table()).to_csv(path, index=False)
    res = CliRunner().invoke(app, ["train", "--data", str(path), "--router", "knn", "--out", str(cache / "art")])
    assert res.exit_code == 1
    assert fragment in res.output
    assert not (cache / "art").exists()
    assert "Traceback" not in res.output


def test_unknown_format_is_refused(cache: Path) -> None:
    path = cache / "t.xlsx"
    path.write_text("nope")
    res = CliRunner().invoke(app, ["eval", "--data", str(path)])
    assert res.exit_code == 1 and ".xlsx" in res.output
