"""`turnout train` and `turnout eval`: the routing library's command-line work (rich output)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from routers.artifacts import save_artifact
from routers.embedding.base import Embedder, close_embedder
from routers.embedding.cache import cache_dir, embed_corpus, model_cache_dir
from routers.embedding.factory import make_embedder
from routers.offline.dataset import RoutingData, load_table
from routers.offline.evaluation import plot_curves, plot_pgr
from routers.offline.replay import plot_regret, replay
from routers.offline.report import EvalOptions, eval_rows, evaluate_group, task_groups
from routers.offline.splits import train_test
from routers.offline.training import train

F32 = npt.NDArray[np.float32]


def load_and_embed(table: Path, embedder_spec: str, console: Console) -> tuple[RoutingData, F32, Embedder]:
    """Load and validate a table, then embed its prompts (from the disk cache when seen before)."""
    data = load_table(table)
    embedder = make_embedder(embedder_spec, model_cache_dir())
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"embedding {len(data)} prompts", total=len(data))
        try:
            x = embed_corpus(embedder, data.prompts, cache_dir(),
                             progress=lambda done, total: bar.update(task, completed=done))
        finally:
            close_embedder(embedder)  # only its id and dimension are used from here on
    return data, x, embedder


def run_train(table: Path, router: str, out: Path, embedder_spec: str, console: Console) -> dict[str, Any]:
    """Train on the table's `train` rows (every row when it has no split) and write the artifact."""
    data, x, embedder = load_and_embed(table, embedder_spec, console)
    rows = train_test(data)[0] if data.splits is not None and (data.splits == "train").any() else np.arange(len(data))
    t0 = time.perf_counter()
    fitted = train(router, data.subset(rows), x[rows], embedder.id)
    path = save_artifact(fitted.artifact, out)
    info = {"artifact": str(path), "version": fitted.artifact.version, "router": router, "rows": len(rows),
            "models": data.models, "train_seconds": round(time.perf_counter() - t0, 1),
            "chosen": {k: fitted.artifact.meta.get(k) for k in ("knn", "probe_c", "knn_weight", "bandit")
                       if k in fitted.artifact.meta}}
    console.print(f"[green]wrote {path}[/green] (version {info['version']}, {len(rows)} training rows, "
                  f"{info['train_seconds']} s)")
    console.print(info["chosen"])
    return info


def run_eval(table: Path, routers: Sequence[str], opts: EvalOptions, embedder_spec: str, json_out: Path | None,
             plot_out: Path | None, online: bool, console: Console) -> dict[str, Any]:
    """Evaluate routers on the table (per task group when asked) and write JSON and plots."""
    data, x, embedder = load_and_embed(table, embedder_spec, console)
    opts = EvalOptions(routers=tuple(routers), split=opts.split, folds=opts.folds, seed=opts.seed,
                       group_level=opts.group_level, train=opts.train)
    groups = task_groups(data, opts.group_level)
    report: dict[str, Any] = {"table": str(table), "data_hash": data.data_hash, "embedder": embedder.id,
                              "cost_source": data.cost_source, "notes": data.notes, "groups": {}}
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("evaluating", total=len(groups))
        for name, idx in groups.items():
            sub = data.subset(idx)

            def step(msg: str, name: str = name) -> None:
                bar.update(task, description=f"{name}: {msg}")

            res = evaluate_group(sub, x[idx], embedder.id, opts, step)
            if online:
                tr_te = eval_rows(sub, opts)
                te = np.concatenate([b for _, b in tr_te])
                rep = replay(sub, x[idx], te, np.arange(len(sub)), opts.train, opts.seed)
                res["online"] = rep.summary()
                if plot_out is not None:
                    plot_regret(_suffixed(plot_out, name, "regret", len(groups)), rep, f"bandit replay: {name}")
            report["groups"][name] = res
            bar.advance(task)
    # The README's JSON shape at the top level (the whole table, or the only group).
    first = next(iter(report["groups"].values()))
    report.update({k: first[k] for k in ("best_single", "oracle", "random", "routers")} if len(groups) == 1 else {})
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2, default=float) + "\n")
    if plot_out is not None:
        for name, res in report["groups"].items():
            _plot_group(_suffixed(plot_out, name, "", len(groups)), name, res)
    print_report(report, console)
    return report


def _suffixed(path: Path, group: str, kind: str, n_groups: int) -> Path:
    parts = [path.stem] + ([group.replace("/", "_")] if n_groups > 1 else []) + ([kind] if kind else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name("-".join(parts) + path.suffix)


def _plot_group(path: Path, name: str, res: dict[str, Any]) -> None:
    routers = res["routers"]
    if len(res["models"]) == 2 and all(r.get("pgr_curve") is not None for r in routers.values()):
        curves = {k: (np.array(r["pgr_curve"])[:, 0], np.array(r["pgr_curve"])[:, 1]) for k, r in routers.items()}
        plot_pgr(path, curves, f"{name}: performance gap recovered vs strong-model calls")
        return
    if res["best_single"]["cost"] is None:
        return  # no costs: quality at lambda 0 is in the table and the JSON
    hulls = {k: np.array(r["curve"]) for k, r in routers.items() if "curve" in r}
    singles = {m: (v["cost"], v["quality"]) for m, v in res["singles"].items()}
    plot_curves(path, hulls, singles, (res["oracle"]["cost"], res["oracle"]["quality"]),
                res["best_single"]["model"], f"{name}: mean quality vs mean cost per prompt")


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def print_report(report: dict[str, Any], console: Console) -> None:
    """One table per group: baselines, then each router's metrics."""
    for name, res in report["groups"].items():
        b, o = res["best_single"], res["oracle"]
        t = Table(title=f"{name}: {res['rows']} evaluation prompts; best single {b['model']} "
                        f"q={b['quality']:.3f}; oracle q={o['quality']:.3f}")
        for col in ("policy", "AIQ", "q @ best cost", "cost to best q", "oracle gap closed", "q @ λ=0",
                    "APGR", "CPT(50%)", "CPT(80%)"):
            t.add_column(col, justify="left" if col == "policy" else "right")
        for k, r in res["routers"].items():
            t.add_row(k, _fmt(r.get("aiq")), _fmt(r.get("quality_at_best_single_cost")),
                      _fmt(r.get("cost_to_best_single_quality"), True), _fmt(r.get("oracle_gap_share"), True),
                      _fmt(r["quality_at_lambda0"]), _fmt(r.get("apgr")), _fmt(r.get("cpt50"), True),
                      _fmt(r.get("cpt80"), True))
        console.print(t)
        if "online" in res:
            console.print(f"bandit replay: {res['online']}")
