"""Summarise the committed routing reports (`loadtest/results/routing/*.json`) as one markdown table.

    python -m loadtest.routing_summary        # writes loadtest/results/routing/README.md

Each JSON comes from `turnout eval`; the commands are listed in the output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "loadtest" / "results" / "routing"
DATA = "../shared/data"
# RouteLLM paper (arXiv 2406.18665), best of its routers per benchmark, GPT-4-1106 vs Mixtral-8x7B.
ROUTELLM_PUBLISHED = {"mmlu": 0.603, "gsm8k": 0.622, "mt_bench": 0.802}
APGR_TARGETS = {"mmlu": 0.75, "gsm8k": 0.70, "mt_bench": 0.78}


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def llmrouter(rep: dict[str, Any]) -> list[str]:
    """Cost-quality metrics against the targets."""
    g = rep["groups"]["all"]
    b, o = g["best_single"], g["oracle"]
    out = ["## llmrouter_9model (test split, prompts also in train removed, costs from list prices)", "",
           f"Command: `turnout eval --data {DATA}/llmrouter_9model/data.parquet --online "
           "--json loadtest/results/routing/llmrouter_9model.json "
           "--plot loadtest/results/routing/llmrouter_9model.png`",
           "", f"{g['rows']} prompts. Best single: {b['model']} quality {b['quality']:.3f} at ${b['cost']:.3g}; "
           f"oracle quality {o['quality']:.3f}.", "",
           "| policy | AIQ | quality at best-single cost | cost to best-single quality | oracle gap closed |",
           "|---|---|---|---|---|",
           "| target (best Turnout router) | >= 0.55 | | <= 40% | >= 15% |"]
    for k, r in g["routers"].items():
        out.append(f"| {k} | {_f(r.get('aiq'))} | {_f(r.get('quality_at_best_single_cost'))} | "
                   f"{_f(r.get('cost_to_best_single_quality'), True)} | {_f(r.get('oracle_gap_share'), True)} |")
    if "online" in g:
        on = g["online"]
        out += ["", f"Bandit replay ({on['steps']} requests, cold start): cumulative regret "
                f"{on['regret_vs_best_fixed']:.1f} against the best fixed model ({on['best_fixed_model']}), "
                f"{on['regret_vs_oracle']:.1f} against the oracle; mean quality {on['mean_quality']:.3f}."]
    return out


def routellm(rep: dict[str, Any]) -> list[str]:
    """APGR/CPT per benchmark beside RouteLLM's published numbers."""
    out = ["## routellm_2model (5-fold cross-validation within each benchmark, contaminated prompts removed)", "",
           f"Command: `turnout eval --data {DATA}/routellm_2model/data.parquet --group-level 1 --router knn "
           "--router cost_aware --json loadtest/results/routing/routellm_2model.json "
           "--plot loadtest/results/routing/routellm_2model.png` (one plot per benchmark)", "",
           "RouteLLM's published APGR comes from routers trained on other data (Chatbot Arena preferences and "
           "augmentations); ours are trained by cross-validation on the benchmark itself. The numbers are not "
           "like for like.", "",
           "| benchmark | prompts | router | APGR | CPT(50%) | CPT(80%) | RouteLLM published APGR | target |",
           "|---|---|---|---|---|---|---|---|"]
    for name, g in rep["groups"].items():
        for k, r in g["routers"].items():
            out.append(f"| {name} | {g['rows']} | {k} | {_f(r.get('apgr'))} | {_f(r.get('cpt50'), True)} | "
                       f"{_f(r.get('cpt80'), True)} | {ROUTELLM_PUBLISHED.get(name, '-')} | "
                       f">= {APGR_TARGETS.get(name, '-')} |")
    return out


def routerdc(reps: dict[str, dict[str, Any]]) -> list[str]:
    """Quality at lambda 0 against best single and oracle (the table has no costs)."""
    out = ["## routerdc_7model (no costs: quality at lambda = 0)", "",
           f"Command: `turnout eval --data {DATA}/routerdc_7model/data.parquet --split SPLIT "
           "--json loadtest/results/routing/routerdc_7model-SPLIT.json`", "",
           "Measured at commit 7800096, before the probe took the prompt's text statistics as input; not re-run "
           "since (its 20,600 prompts take about 25 minutes to embed on this machine).", "",
           "| split | prompts | best single (quality) | oracle | router | quality at lambda 0 |",
           "|---|---|---|---|---|---|"]
    for split, rep in reps.items():
        g = rep["groups"]["all"]
        for k, r in g["routers"].items():
            out.append(f"| {split} | {g['rows']} | {g['best_single']['model']} ({g['best_single']['quality']:.3f}) | "
                       f"{g['oracle']['quality']:.3f} | {k} | {r['quality_at_lambda0']:.3f} |")
    return out


def main() -> None:
    """Write the summary."""
    parts = ["# Routing results", "", "Produced by `python -m loadtest.routing_summary` from the JSON reports "
             "beside this file. Plots: the PNG files here.", ""]
    if (RESULTS / "llmrouter_9model.json").exists():
        parts += [*llmrouter(json.loads((RESULTS / "llmrouter_9model.json").read_text())), ""]
    if (RESULTS / "routellm_2model.json").exists():
        parts += [*routellm(json.loads((RESULTS / "routellm_2model.json").read_text())), ""]
    dc = {s: json.loads((RESULTS / f"routerdc_7model-{s}.json").read_text()) for s in ("test", "ood_test")
          if (RESULTS / f"routerdc_7model-{s}.json").exists()}
    if dc:
        parts += [*routerdc(dc), ""]
    for extra in ("decision.md", "../embedding.md"):
        if (RESULTS / extra).exists():
            parts += ["", *(RESULTS / extra).read_text().replace("# ", "## ", 1).splitlines()]
    (RESULTS / "README.md").write_text("\n".join(parts) + "\n")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
