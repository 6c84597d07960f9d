"""`turnout feedback-table`: a routing table from served traffic: each request the gateway logged with its prompt
(`server.log_prompts` on), joined by its id to the score a client gave it through `POST /v1/feedback` (logged
as a `feedback_for` line). A row holds the score and cost of the model that served it; the other models'
columns are unknown (NaN), as the table format allows, since nobody asked them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from server.fleet.replay import Served, read_served
from server.fleet.request_log import log_records
from server.fleet.sources import SourceError


@dataclass(slots=True)
class FeedbackTable:
    """What was joined: rows written, per model, and the feedback whose request had no prompt logged."""

    rows: int = 0
    per_model: dict[str, int] = field(default_factory=dict)
    unmatched: int = 0


def read_feedback(path: Path) -> dict[str, float]:
    """Request id -> the score its feedback gave (the first one: a repeat is ignored by the gateway too)."""
    scores: dict[str, float] = {}
    for row in log_records(path, "feedback_for"):
        score = row.get("score")
        if isinstance(score, int | float) and math.isfinite(score):
            scores.setdefault(str(row["feedback_for"]), float(score))
    return scores


def feedback_table(log: Path, out: Path) -> FeedbackTable:
    """Join the log's requests and feedback into the routing table `out` (parquet)."""
    import pandas as pd  # the training stack: an offline command

    served, _ = read_served(log)
    scores = read_feedback(log)
    by_id: dict[str, Served] = {s.request_id: s for s in served}
    report = FeedbackTable(unmatched=sum(1 for rid in scores if rid not in by_id))
    joined = [(by_id[rid], score) for rid, score in scores.items() if rid in by_id]
    if not joined:
        raise SourceError(f"{log}: no feedback joined to a logged request with its prompt ({len(scores)} feedback "
                          f"lines, {len(served)} requests with prompts; turn server.log_prompts on)")
    models = sorted({s.model for s, _ in joined})
    if len(models) < 2:
        raise SourceError(f"{log}: the scored requests were all served by {models}; a routing table needs scores of "
                          "at least two models (serve some traffic with another, e.g. a weighted policy)")
    rows = []
    for s, score in joined:
        row: dict[str, object] = {"prompt_id": s.request_id, "prompt": s.text}
        for m in models:
            row[f"score__{m}"] = score if m == s.model else math.nan
            row[f"cost_usd__{m}"] = (s.cost_usd if s.cost_usd is not None else math.nan) if m == s.model else math.nan
        rows.append(row)
        report.per_model[s.model] = report.per_model.get(s.model, 0) + 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    tmp.replace(out)
    report.rows = len(rows)
    return report
