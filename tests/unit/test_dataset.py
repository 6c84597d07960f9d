"""Routing tables: loading every format, rejecting bad tables by name, costs, and leak-free splits."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from routers.offline.dataset import RoutingData, load_table
from routers.offline.prices import TableError
from routers.offline.splits import dedupe_within, kfold, train_test

DATA = Path("/work/shared/data")
A, B = "org/model-a.1", "model-b"  # model names may contain '/' and '.'


def frame(**extra: Any) -> pd.DataFrame:
    """A small valid table: 4 prompts, 2 models, a task and a split column."""
    base: dict[str, Any] = {
        "prompt": ["what is 2+2?", "name a colour", "déjà vu?", "what is 2+2?"],
        f"score__{A}": [1.0, 0.5, 0.0, 1.0],
        f"score__{B}": [0.0, 1.0, np.nan, 0.0],
        "task": ["math", "chat", "chat", "math"],
        "split": ["train", "train", "test", "test"],
    }
    base.update(extra)
    return pd.DataFrame(base)


def write(df: pd.DataFrame, path: Path) -> Path:
    """Write `df` in the format named by the extension of `path`."""
    if path.suffix == ".parquet":
        df.to_parquet(path)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        lines = [json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
                 for r in df.to_dict(orient="records")]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("ext", [".parquet", ".jsonl", ".csv"])
def test_loads_all_three_formats_alike(tmp_path: Path, ext: str) -> None:
    data = load_table(write(frame(), tmp_path / f"t{ext}"))
    assert data.models == [A, B]
    assert data.prompts[2] == "déjà vu?"
    np.testing.assert_array_equal(data.scores[:, 0], [1.0, 0.5, 0.0, 1.0])
    assert np.isnan(data.scores[2, 1])
    assert data.tasks.tolist() == ["math", "chat", "chat", "math"]
    assert data.splits is not None and data.splits.tolist() == ["train", "train", "test", "test"]
    assert data.prompt_ids == ["row-0", "row-1", "row-2", "row-3"]
    assert data.costs is None and data.cost_source == "none"
    assert len(data.data_hash) == 64


def test_optional_columns_absent(tmp_path: Path) -> None:
    df = frame().drop(columns=["task", "split"])
    data = load_table(write(df, tmp_path / "t.csv"))
    assert data.tasks.tolist() == [""] * 4
    assert data.splits is None
    with pytest.raises(TableError, match="split"):
        train_test(data)


def test_csv_keeps_text_that_looks_like_null(tmp_path: Path) -> None:
    df = frame(prompt=["NA", "null", "None", "nan"], prompt_id=["001", "002", "003", "004"])
    data = load_table(write(df, tmp_path / "t.csv"))
    assert data.prompts == ["NA", "null", "None", "nan"]
    assert data.prompt_ids == ["001", "002", "003", "004"]


def expect_error(tmp_path: Path, df: pd.DataFrame, ext: str, *fragments: str) -> None:
    with pytest.raises(TableError) as info:
        load_table(write(df, tmp_path / f"bad{ext}"))
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("ext", [".parquet", ".jsonl", ".csv"])
def test_bad_tables_are_rejected_by_name(tmp_path: Path, ext: str) -> None:
    expect_error(tmp_path, frame().drop(columns=["prompt"]), ext, "'prompt'")
    expect_error(tmp_path, frame().drop(columns=[f"score__{B}"]), ext, "at least two", "score__")
    bad_text = frame(**{f"score__{B}": ["0", "1", "high", "0"]})
    expect_error(tmp_path, bad_text, ext, f"'score__{B}'", "'high'", "row 2")
    expect_error(tmp_path, frame(**{f"score__{A}": [1.0, 1.5, 0.0, 1.0]}), ext, f"'score__{A}'", "1.5", "row 1")
    expect_error(tmp_path, frame(prompt=["a", "", "c", "d"]), ext, "'prompt'", "row 1")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    df = frame(prompt=["a", "b", None, "d"], **{f"score__{A}": [1.0, -0.5, 0.0, 1.0]})
    expect_error(tmp_path, df, ".parquet", "'prompt': row 2", f"'score__{A}': value -0.5 at row 1")


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(TableError, match=r"\.xlsx"):
        load_table(tmp_path / "t.xlsx")
    with pytest.raises(TableError, match=r"nope\.csv"):
        load_table(tmp_path / "nope.csv")


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "score__x": 1, "score__y": 0}\n{oops\n')
    with pytest.raises(TableError, match="line 2"):
        load_table(path)


def test_contaminated_rows_are_dropped_and_noted(tmp_path: Path) -> None:
    df = frame(contaminated=[False, True, False, False])
    data = load_table(write(df, tmp_path / "t.parquet"))
    assert len(data) == 3 and "name a colour" not in data.prompts
    assert any("1 rows flagged contaminated" in n for n in data.notes)
    assert len(load_table(tmp_path / "t.parquet", drop_contaminated=False)) == 4


def test_rows_without_any_score_are_dropped(tmp_path: Path) -> None:
    df = frame(**{f"score__{A}": [1.0, 0.5, np.nan, 1.0]})
    data = load_table(write(df, tmp_path / "t.jsonl"))
    assert len(data) == 3
    assert any("every score is NaN" in n for n in data.notes)


def test_cost_columns_used_as_is_and_validated(tmp_path: Path) -> None:
    df = frame(**{f"cost_usd__{A}": [0.1, 0.2, 0.3, 0.4], f"cost_usd__{B}": [1.0, 1.0, np.nan, 1.0]})
    data = load_table(write(df, tmp_path / "t.csv"), prices={A: (1.0, 1.0), B: (1.0, 1.0)})
    assert data.cost_source == "table" and data.costs is not None
    np.testing.assert_allclose(data.costs[:, 0], [0.1, 0.2, 0.3, 0.4])
    expect_error(tmp_path, frame(**{f"cost_usd__{A}": [0.1, -1.0, 0.3, 0.4], f"cost_usd__{B}": [1.0] * 4}),
                 ".csv", f"'cost_usd__{A}'", "row 1")
    expect_error(tmp_path, frame(**{f"cost_usd__{A}": [0.1] * 4}), ".csv", "not for", B)


def test_costs_from_prices_and_output_chars(tmp_path: Path) -> None:
    df = frame(**{f"output_chars__{B}": [400.0, np.nan, 7.0, 0.0]})
    data = load_table(write(df, tmp_path / "t.parquet"), prices={A: (1.0, 2.0), B: (3.0, 4.0)}, output_tokens=100)
    assert data.cost_source == "prices" and data.costs is not None
    prompt_tokens = [math.ceil(len(p.encode()) / 4) for p in data.prompts]  # "déjà vu?" is 10 bytes -> 3
    assert prompt_tokens[2] == 3
    answer_b = [100, 100, 2, 0]  # ceil(chars / 4) where given, else output_tokens
    for i, pt in enumerate(prompt_tokens):
        assert data.costs[i, 0] == pytest.approx((pt * 1.0 + 100 * 2.0) / 1e6)
        assert data.costs[i, 1] == pytest.approx((pt * 3.0 + answer_b[i] * 4.0) / 1e6)


def test_prices_missing_a_model_are_named(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="model-b"):
        load_table(write(frame(), tmp_path / "t.csv"), prices={A: (1.0, 1.0)})


@pytest.mark.parametrize(
    "doc",
    [
        {"prices_usd_per_1M_tokens": {A: {"input_price": 1.0, "output_price": 2.0},
                                      B: {"input_price": 0.5, "output_price": 0.5}}},
        {"prices": {A: {"input_per_1m": 1.0, "output_per_1m": 2.0}, B: {"input_per_1m": 0.5, "output_per_1m": 0.5}}},
    ],
)
def test_costs_from_models_json_beside_the_table(tmp_path: Path, doc: dict[str, Any]) -> None:
    (tmp_path / "models.json").write_text(json.dumps(doc))
    data = load_table(write(frame(), tmp_path / "t.jsonl"), output_tokens=10)
    assert data.cost_source == "prices" and data.costs is not None
    assert data.costs[0, 0] == pytest.approx((math.ceil(len("what is 2+2?") / 4) * 1.0 + 10 * 2.0) / 1e6)
    assert any("models.json" in n for n in data.notes)


def test_models_json_missing_a_model_is_an_error(tmp_path: Path) -> None:
    doc = {"prices": {A: {"input_per_1m": 1.0, "output_per_1m": 2.0}}}
    (tmp_path / "models.json").write_text(json.dumps(doc))
    with pytest.raises(TableError, match="model-b"):
        load_table(write(frame(), tmp_path / "t.csv"))


def dup_data(tmp_path: Path, n: int = 60) -> RoutingData:
    rng = np.random.default_rng(1)
    prompts = [f"p{i % 25}" for i in range(n)]  # many prompts repeated
    df = pd.DataFrame({"prompt": prompts, "score__x": rng.random(n), "score__y": rng.random(n),
                       "task": [["t1", "t2", "t3"][i % 3] for i in range(n)]})
    return load_table(write(df, tmp_path / "d.parquet"))


@pytest.mark.parametrize("stratify", [False, True])
def test_kfold_never_splits_a_prompt_across_sides(tmp_path: Path, stratify: bool) -> None:
    data = dup_data(tmp_path)
    folds = kfold(data, k=5, seed=3, stratify_by_task=stratify)
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(len(data)))  # every row tested exactly once
    for tr, te in folds:
        assert not {data.prompts[i] for i in tr} & {data.prompts[i] for i in te}
        assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(data)
    again = kfold(data, k=5, seed=3, stratify_by_task=stratify)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))


def test_stratified_kfold_splits_each_task(tmp_path: Path) -> None:
    n = 90
    df = pd.DataFrame({"prompt": [f"q{i}" for i in range(n)], "score__x": [0.5] * n, "score__y": [0.5] * n,
                       "task": ["big"] * 80 + ["small"] * 10})
    data = load_table(write(df, tmp_path / "s.csv"))
    for _, te in kfold(data, k=5, seed=0, stratify_by_task=True):
        assert (data.tasks[te] == "small").sum() == 2 and (data.tasks[te] == "big").sum() == 16


def test_train_test_removes_test_prompts_seen_in_train(tmp_path: Path) -> None:
    data = load_table(write(frame(), tmp_path / "t.parquet"))
    train, test = train_test(data)
    assert train.tolist() == [0, 1]
    assert test.tolist() == [2]  # row 3 repeats train row 0's prompt
    assert any("removed 1 'test' rows" in n for n in data.notes)


def test_dedupe_within_keeps_first(tmp_path: Path) -> None:
    data = dup_data(tmp_path, n=30)
    kept = dedupe_within(data, np.arange(30)[::-1])
    assert len(kept) == 25 and kept[0] == 29
    assert len({data.prompts[i] for i in kept}) == 25


def test_subset_selects_rows(tmp_path: Path) -> None:
    data = load_table(write(frame(), tmp_path / "t.parquet"), prices={A: (1.0, 1.0), B: (1.0, 1.0)})
    sub = data.subset(np.array([3, 1]))
    assert sub.prompts == ["what is 2+2?", "name a colour"] and sub.prompt_ids == ["row-3", "row-1"]
    assert sub.scores.shape == (2, 2) and sub.costs is not None and sub.costs.shape == (2, 2)
    assert sub.tasks.tolist() == ["math", "chat"] and sub.data_hash == data.data_hash


def real(folder: str) -> RoutingData:
    path = DATA / folder / "data.parquet"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    return load_table(path)


def test_real_llmrouter_9model() -> None:
    data = real("llmrouter_9model")
    assert (len(data), len(data.models), data.cost_source) == (6108, 9, "prices")
    assert data.costs is not None and (data.costs > 0).all()
    train, test = train_test(data)
    assert (len(train), len(test)) == (5608, 500 - 119)


def test_real_routellm_2model() -> None:
    data = real("routellm_2model")
    assert (len(data), len(data.models)) == (15441 - 25, 2)
    assert data.costs is None and data.cost_source == "none" and data.splits is None


def test_real_routerdc_7model() -> None:
    data = real("routerdc_7model")
    assert (len(data), len(data.models), data.costs) == (20600, 7, None)
    assert "meta-llama/Meta-Llama-3-8B" in data.models
