"""Routing tables: loading and validating them (format: shared/data/README.md). Prices and cost estimates
are `routers.offline.prices`; train/test splits and folds are `routers.offline.splits`.

A routing table has one row per prompt: `prompt`, one `score__<model>` column per model (quality in
[0, 1], NaN = unknown) and optionally `cost_usd__<model>`, `output_chars__<model>`, `task`, `split`,
`prompt_id` and `contaminated`. Row numbers in error messages count data rows from 0 (the CSV header
is not a row). Loading reads the file once and writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from routers.offline.prices import (
    OUT_CHARS,
    FloatArray,
    Prices,
    TableError,
    choose_prices,
    estimate_costs,
    token_rule,
)

SCORE, COST = "score__", "cost_usd__"
_NULL_TOKENS = frozenset({"", "nan", "NaN", "NA", "N/A", "null", "None"})
_TRUE, _FALSE = frozenset({"true", "1", "1.0", "yes"}), frozenset({"false", "0", "0.0", "no", ""})

IndexArray = npt.NDArray[np.intp]
StrArray = npt.NDArray[np.str_]


@dataclass
class RoutingData:
    """A validated routing table: n prompts x m models.

    `scores` is n x m (NaN = unknown); `costs` is n x m USD per prompt, or None when the table has no
    cost columns and no prices are known (`cost_source` says which: "table", "prices" or "none").
    `tasks` is "" where the table has no task column; `splits` is None without a split column.
    `notes` records what loading or splitting dropped or estimated, for reports.
    """

    prompts: list[str]
    models: list[str]
    scores: FloatArray
    costs: FloatArray | None
    tasks: StrArray
    splits: StrArray | None
    prompt_ids: list[str]
    data_hash: str
    cost_source: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: npt.NDArray[np.integer[Any]]) -> RoutingData:
        """The rows `idx` (in that order), sharing models, hash and a copy of the notes."""
        rows = np.asarray(idx, dtype=np.intp)
        return replace(
            self,
            prompts=[self.prompts[i] for i in rows],
            scores=self.scores[rows],
            costs=None if self.costs is None else self.costs[rows],
            tasks=self.tasks[rows],
            splits=None if self.splits is None else self.splits[rows],
            prompt_ids=[self.prompt_ids[i] for i in rows],
            notes=list(self.notes),
        )


def load_table(
    path: Path,
    *,
    prices: Prices | None = None,
    output_tokens: int = 256,
    drop_contaminated: bool = True,
) -> RoutingData:
    """Load and validate a routing table (.parquet, .jsonl or .csv).

    Every problem with the table is collected and raised together as one `TableError` before anything
    is returned. Costs come from `cost_usd__<model>` columns if present, else from `prices` (model ->
    (input, output) USD per 1M tokens), else from a `models.json` beside the table; tokens are then
    estimated as ceil(UTF-8 bytes / 4) for the prompt and ceil(output_chars__<model> / 4) or
    `output_tokens` for the answer. Rows flagged `contaminated` (when `drop_contaminated`) and rows
    with no known score are dropped and noted.
    """
    raw = _read_bytes(path)
    df = _parse(path, raw)
    models = _models(df)
    problems: list[str] = []
    prompts = _prompts(df["prompt"], problems)
    scores = _score_matrix(df, models, problems)
    table_costs = _table_costs(df, models, scores, problems)
    contaminated = _bools(df["contaminated"], "contaminated", problems) if "contaminated" in df else None
    price_map, price_origin = (None, "") if table_costs is not None else choose_prices(path, prices, models, problems)
    out_chars = _out_chars(df, models, problems) if price_map is not None else None
    if problems:
        raise TableError("; ".join(problems))
    assert prompts is not None and scores is not None  # no problems means every column parsed

    notes: list[str] = []
    if table_costs is not None and prices is not None:
        notes.append("the given prices were ignored: the table has cost columns")
    rows = _rows_to_keep(scores, contaminated, drop_contaminated, notes)
    costs, cost_source = table_costs, "table" if table_costs is not None else "none"
    if price_map is not None:
        costs, cost_source = estimate_costs(prompts, models, price_map, out_chars, output_tokens), "prices"
        notes.append(f"costs estimated from prices in {price_origin}: {token_rule(out_chars, output_tokens)}")
    ids = _texts(df["prompt_id"], None) if "prompt_id" in df else [f"row-{i}" for i in range(len(df))]
    for what, values in (("prompt_id", [ids[i] for i in rows]), ("prompt text", [prompts[i] for i in rows])):
        if len(set(values)) < len(values):
            notes.append(f"{len(values) - len(set(values))} rows repeat an earlier row's {what}")
    splits = _texts(df["split"], "") if "split" in df else None
    return RoutingData(
        prompts=[prompts[i] for i in rows],
        models=models,
        scores=scores[rows],
        costs=None if costs is None else costs[rows],
        tasks=np.array(_texts(df["task"], "") if "task" in df else [""] * len(df), dtype=str)[rows],
        splits=None if splits is None else np.array(splits, dtype=str)[rows],
        prompt_ids=[ids[i] for i in rows],
        data_hash=hashlib.sha256(raw).hexdigest(),
        cost_source=cost_source,
        notes=notes,
    )


def _rows_to_keep(
    scores: FloatArray, contaminated: npt.NDArray[np.bool_] | None, drop_contaminated: bool, notes: list[str]
) -> IndexArray:
    """Rows surviving the contamination filter and having at least one known score (both noted)."""
    keep = np.ones(scores.shape[0], dtype=bool)
    if contaminated is not None and contaminated.any():
        if drop_contaminated:
            keep &= ~contaminated
            notes.append(f"dropped {int(contaminated.sum())} rows flagged contaminated")
        else:
            notes.append(f"kept {int(contaminated.sum())} rows flagged contaminated")
    unknown = np.isnan(scores).all(axis=1) & keep
    if unknown.any():
        keep &= ~unknown
        notes.append(f"dropped {int(unknown.sum())} rows whose every score is NaN")
    if not keep.any():
        raise TableError("no rows left after dropping contaminated rows and rows without any score")
    return np.flatnonzero(keep)


def _models(df: pd.DataFrame) -> list[str]:
    """The model names from the `score__` columns, after checking the table's required shape."""
    models = [str(c)[len(SCORE) :] for c in df.columns if str(c).startswith(SCORE)]
    problems = [] if "prompt" in df.columns else ["missing required column 'prompt'"]
    if len(models) < 2:
        problems.append(f"need at least two '{SCORE}<model>' columns, found {len(models)}: {models}")
    if len(df) == 0:
        problems.append("the table has no rows")
    if problems:
        raise TableError("; ".join(problems))
    return models


def _read_bytes(path: Path) -> bytes:
    if path.suffix.lower() not in (".parquet", ".jsonl", ".csv"):
        raise TableError(f"{path.name}: unsupported extension {path.suffix!r} (use .parquet, .jsonl or .csv)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TableError(f"cannot read routing table {path}: {exc.strerror or exc}") from exc


def _parse(path: Path, raw: bytes) -> pd.DataFrame:
    ext = path.suffix.lower()
    try:
        if ext == ".parquet":
            return pd.read_parquet(io.BytesIO(raw))
        if ext == ".csv":
            # Everything as text, so that a prompt "NA" stays a prompt; numbers are parsed per column.
            return pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, na_values=[])
    except (ValueError, OSError, pd.errors.ParserError) as exc:  # pyarrow errors subclass these
        raise TableError(f"{path.name}: cannot parse as {ext}: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TableError(f"{path.name}: not UTF-8 text (byte {exc.start})") from exc
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TableError(f"{path.name}: line {lineno} is not valid JSON: {exc.msg}") from exc
        if not isinstance(obj, dict):
            raise TableError(f"{path.name}: line {lineno} is not a JSON object")
        records.append(obj)
    return pd.DataFrame.from_records(records)


def _is_null(v: object) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _prompts(col: pd.Series, problems: list[str]) -> list[str] | None:
    bad = [i for i, v in enumerate(col.tolist()) if not isinstance(v, str) or not v.strip()]
    if bad:
        problems.append(f"column 'prompt': row {bad[0]} is null or empty ({len(bad)} such rows)")
        return None
    return [str(v) for v in col.tolist()]


def _numeric(col: pd.Series, name: str, problems: list[str]) -> FloatArray | None:
    """The column as float64 (null -> NaN), or None after noting its first non-numeric row."""
    if pd.api.types.is_bool_dtype(col) or pd.api.types.is_numeric_dtype(col):
        values: FloatArray = col.to_numpy(dtype=np.float64, na_value=np.nan)
        return values
    out = np.full(len(col), np.nan)
    for i, v in enumerate(col.tolist()):
        if _is_null(v) or (isinstance(v, str) and v.strip() in _NULL_TOKENS):
            continue
        try:
            out[i] = float(v)  # bools, ints, floats and numeric strings
            continue
        except (TypeError, ValueError):
            problems.append(f"column {name!r}: non-numeric value {v!r} at row {i} (first bad row)")
            return None
    return out


def _score_matrix(df: pd.DataFrame, models: list[str], problems: list[str]) -> FloatArray | None:
    cols: list[FloatArray] = []
    for model in models:
        name = SCORE + model
        values = _numeric(df[name], name, problems)
        if values is None:
            continue
        bad = np.flatnonzero(~np.isnan(values) & ((values < 0) | (values > 1)))
        if bad.size:
            i = int(bad[0])
            problems.append(f"column {name!r}: value {float(values[i])!r} at row {i} is outside [0, 1]")
        cols.append(values)
    return np.column_stack(cols) if len(cols) == len(models) else None


def _table_costs(
    df: pd.DataFrame, models: list[str], scores: FloatArray | None, problems: list[str]
) -> FloatArray | None:
    """The `cost_usd__` columns as an n x m matrix, or None when the table has none."""
    cost_models = [str(c)[len(COST) :] for c in df.columns if str(c).startswith(COST)]
    if not cost_models:
        return None
    orphans = sorted(set(cost_models) - set(models))
    if orphans:
        problems.append(f"cost columns without a score column: {[COST + m for m in orphans]}")
    missing = [m for m in models if m not in cost_models]
    if missing:
        problems.append(f"cost columns are given for some models but not for {missing}")
        return None
    cols: list[FloatArray] = []
    for j, model in enumerate(models):
        name = COST + model
        values = _numeric(df[name], name, problems)
        if values is None:
            continue
        bad = np.flatnonzero((values < 0) | np.isinf(values))
        if bad.size:
            problems.append(f"column {name!r}: value {float(values[bad[0]])!r} at row {bad[0]} is not a cost >= 0")
        # An unknown cost is only acceptable where the answer itself is unknown.
        if scores is not None:
            gap = np.flatnonzero(np.isnan(values) & ~np.isnan(scores[:, j]))
            if gap.size:
                problems.append(f"column {name!r}: row {gap[0]} has a score but no cost ({gap.size} such rows)")
        cols.append(values)
    return np.column_stack(cols) if len(cols) == len(models) else None


def _bools(col: pd.Series, name: str, problems: list[str]) -> npt.NDArray[np.bool_] | None:
    """A flag column (null = False); None after noting its first unreadable row."""
    if pd.api.types.is_bool_dtype(col):
        flags: npt.NDArray[np.bool_] = col.to_numpy(dtype=bool, na_value=False)
        return flags
    out = np.zeros(len(col), dtype=bool)
    for i, v in enumerate(col.tolist()):
        text = "" if _is_null(v) else str(v).strip().lower()
        if text in _TRUE or text in _FALSE:
            out[i] = text in _TRUE
        else:
            problems.append(f"column {name!r}: value {v!r} at row {i} is not a boolean")
            return None
    return out


def _texts(col: pd.Series, default: str | None) -> list[str]:
    """Text values; nulls become `default`, or "row-<i>" when default is None."""
    return [(f"row-{i}" if default is None else default) if _is_null(v) else str(v) for i, v in enumerate(col)]


def _out_chars(df: pd.DataFrame, models: list[str], problems: list[str]) -> FloatArray:
    """Per-prompt answer lengths in characters (NaN where unknown) from `output_chars__` columns."""
    out = np.full((len(df), len(models)), np.nan)
    for j, name in enumerate(OUT_CHARS + m for m in models):
        values = _numeric(df[name], name, problems) if name in df else None
        if values is not None and (values < 0).any():
            problems.append(f"column {name!r}: row {np.flatnonzero(values < 0)[0]} is negative")
        elif values is not None:
            out[:, j] = values
    return out
