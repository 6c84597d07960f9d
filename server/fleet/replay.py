"""`turnout replay`: what a candidate policy would have decided on the requests the gateway actually served, and
what that would have changed, predicted by the candidate's own predictors, with no call to any model.

Reads the gateway's request log (JSON lines of `turnout.requests`; the prompt is there only when the operator
turned `server.log_prompts` on). For every served request with a prompt, the candidate policy (built from a
config, exactly as the gateway builds it) decides on the same text; the report compares its choices with the
models that served: agreement, the routing mix, the predicted quality of both choices and the cost (the served
answer's real cost beside the candidate's predicted cost).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routers.base import Router, RoutingDecision, RoutingRequest
from routers.embedding.base import Embedder
from server.config import TurnoutConfig
from server.fleet.request_log import log_records, logged_messages
from server.fleet.sources import SourceError, item_from_record
from server.policy.table import RoutingTable, artifact_context
from server.upstream.workers import WorkerRegistry


@dataclass(frozen=True, slots=True)
class Served:
    """One logged request: its id, the text a policy reads, the model that answered and what it cost."""

    request_id: str
    text: str
    model: str
    cost_usd: float | None


@dataclass(slots=True)
class ReplayReport:
    """The candidate against what was served (see the module docstring)."""

    policy: str
    requests: int = 0
    skipped: int = 0  # log lines without a prompt or a model that answered
    agree: int = 0
    served_mix: Counter[str] = field(default_factory=Counter)
    candidate_mix: Counter[str] = field(default_factory=Counter)
    served_quality: list[float] = field(default_factory=list)  # the candidate's prediction for the served model
    candidate_quality: list[float] = field(default_factory=list)
    served_cost_usd: float = 0.0  # what the served answers cost
    candidate_cost_usd: float = 0.0  # what the candidate's choices are predicted to cost
    not_a_candidate: int = 0  # requests served by a model the candidate cannot choose

    def as_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return {"policy": self.policy, "requests": self.requests, "skipped": self.skipped,
                "agreement": self.agree / self.requests if self.requests else None,
                "served_mix": dict(self.served_mix), "candidate_mix": dict(self.candidate_mix),
                "predicted_quality_served": mean(self.served_quality),
                "predicted_quality_candidate": mean(self.candidate_quality),
                "cost_usd_served": self.served_cost_usd, "predicted_cost_usd_candidate": self.candidate_cost_usd,
                "served_by_a_non_candidate": self.not_a_candidate}


def read_served(path: Path) -> tuple[list[Served], int]:
    """The logged requests that carry a prompt and name the model that answered, and how many lines did not."""
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    served: list[Served] = []
    skipped = 0
    for row in log_records(path, "request_id"):
        messages = logged_messages(row)
        item = item_from_record({"messages": messages}, "log", []) if messages else None
        if item is None or not row.get("model") or row.get("status") != "ok":
            skipped += 1
            continue
        cost = row.get("cost_usd")
        served.append(Served(str(row["request_id"]), item.text, str(row["model"]),
                             float(cost) if isinstance(cost, int | float) else None))
    return served, skipped


def _prediction(decision: RoutingDecision, model: str, model_of: dict[str, str]) -> tuple[float | None, float | None]:
    """The decision's predicted quality and cost for the candidate that is `model`."""
    for c in decision.ranking:
        if model_of.get(c.name, c.name) == model:
            return c.predicted_quality, c.predicted_cost_usd
    return None, None


def replay(config: TurnoutConfig, config_path: Path | None, policy: str, log: Path, embedder: Embedder,
           batch: int = 64) -> ReplayReport:
    """Decide every logged request with `policy` of `config` and compare (see the module docstring)."""
    table = RoutingTable(config, artifact_context(config_path, embedder.id), str(config_path or "config"))
    if policy not in table.routers:
        raise SourceError(f"no policy {policy!r} in the config (policies: {sorted(table.routers)})")
    router: Router = table.routers[policy]
    served, skipped = read_served(log)
    report = ReplayReport(policy, skipped=skipped)
    candidates = tuple(router.targets())
    # A policy names workers or models; the log names the model that answered: compare models.
    registry = WorkerRegistry(config)
    model_of = {t: registry.resolve(t)[0].model for t in candidates}
    for start in range(0, len(served), batch):
        part = served[start:start + batch]
        vectors = embedder.embed([s.text for s in part]) if router.needs_embedding else None
        for i, s in enumerate(part):
            req = RoutingRequest(request_id=s.request_id, text=s.text, candidates=candidates,
                                 embedding=vectors[i] if vectors is not None else None)
            _count(report, s, router.route(req), model_of)
    return report


def _count(report: ReplayReport, s: Served, decision: RoutingDecision, model_of: dict[str, str]) -> None:
    chosen = model_of.get(decision.chosen, decision.chosen)
    report.requests += 1
    report.served_mix[s.model] += 1
    report.candidate_mix[chosen] += 1
    report.agree += chosen == s.model
    report.served_cost_usd += s.cost_usd or 0.0
    q_new, c_new = _prediction(decision, chosen, model_of)
    q_old, _ = _prediction(decision, s.model, model_of)
    report.candidate_cost_usd += c_new if c_new is not None and math.isfinite(c_new) else 0.0
    if q_new is not None:
        report.candidate_quality.append(q_new)
    if q_old is None:
        report.not_a_candidate += 1
    else:
        report.served_quality.append(q_old)
