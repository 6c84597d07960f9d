"""Does a small language model's prefill state route better than a sentence embedding?

For the three routing tables (seeded samples where a table is large), this computes the hidden states of
Gemma 3 270M and SmolLM2-135M-Instruct reading each prompt (`loadtest/prefill/extract.py`, run in the vLLM
worker's virtualenv, resumable), then trains the project's own routers (kNN and the cost-aware kNN + probe
ensemble, `routers.offline.training.train` with its default search spaces) on each feature set and reports
the data README's metrics on the evaluation rows. Which layer and pooling stands for each model is chosen by
the routers' own cross-validation score on the `llmrouter_9model` training rows, then used unchanged on
every table; the standardisation of the hidden states (per dimension) is fitted on those same training rows.

    python -m loadtest.prefill.study [--work DIR] [--out loadtest/results/routing/prefill]

Interrupted, the same command resumes: extracted chunks and embeddings are kept in --work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console

from loadtest.results_io import write_results
from routers.embedding.cache import cache_dir, embed_corpus, model_cache_dir
from routers.embedding.factory import make_embedder
from routers.offline.dataset import RoutingData, load_table
from routers.offline.report import EvalOptions, artifact_predictions, eval_rows, summarise, task_groups
from routers.offline.training import TrainOptions, train
from testkit.engines import VLLM_CACHE

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
LMS = ("gemma3-270m", "smollm2-135m")
ROUTERS = ("knn", "cost_aware")
console = Console(width=150)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: a table's rows (a seeded sample or all), and how they are split."""

    name: str
    table: str
    split: str = "test"  # the table's split, or "cv" for 5-fold cross-validation per task group
    sample: dict[str, int] | None = None  # rows per split (or per task with "cv") to keep; None keeps all


EVALUATIONS = (
    Evaluation("llmrouter_9model test", "llmrouter_9model"),
    Evaluation("routellm_2model 5-fold", "routellm_2model", split="cv", sample={"mmlu": 2000}),
    Evaluation("routerdc_7model test", "routerdc_7model", sample={"train": 3000, "test": 1500, "ood_test": 1500}),
    Evaluation("routerdc_7model ood_test", "routerdc_7model", split="ood_test",
               sample={"train": 3000, "test": 1500, "ood_test": 1500}),
)


def text_key(text: str) -> str:
    """A prompt's key in the feature files."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def sampled(data: RoutingData, ev: Evaluation, seed: int = 0) -> RoutingData:
    """The evaluation's rows: per split (or per top-level task for "cv"), at most the sample's count, seeded."""
    if ev.sample is None:
        return data
    rng = np.random.default_rng(seed)
    labels = data.splits if ev.split != "cv" else np.array([str(t).split("/")[0] for t in data.tasks])
    assert labels is not None
    keep: list[IntArray] = []
    for label in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == label)
        n = ev.sample.get(label, len(rows))
        keep.append(np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False)))
    return data.subset(np.sort(np.concatenate(keep)))


def extract(prompts: list[str], lm: str, work: Path) -> dict[str, npt.NDArray[np.float16]]:
    """Hidden states per prompt key (layers x poolings x hidden), extracted where missing."""
    out = work / f"features-{lm}"
    source = work / "prompts.jsonl"
    keys = sorted({text_key(p) for p in prompts})
    by_key = {text_key(p): p for p in prompts}
    source.write_text("".join(json.dumps({"id": k, "text": by_key[k]}) + "\n" for k in keys), encoding="utf-8")
    python = VLLM_CACHE / "vllm-venv" / "bin" / "python"
    cmd = [str(python if python.exists() else sys.executable), str(REPO / "loadtest" / "prefill" / "extract.py"),
           "--model-dir", str(VLLM_CACHE / "models" / lm), "--prompts", str(source), "--out", str(out)]
    # The prompt set decides the chunks: a different set starts a fresh directory.
    stamp = out / "prompts.sha1"
    digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()
    if out.exists() and (not stamp.exists() or stamp.read_text() != digest):
        for f in out.glob("chunk-*.npz"):
            f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest)
    console.print(f"[bold]{lm}[/bold]: hidden states of {len(keys)} prompts into {out}")
    done = subprocess.run(cmd, check=False, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        raise SystemExit(f"extraction stopped ({done.returncode}); rerun to resume")
    feats: dict[str, npt.NDArray[np.float16]] = {}
    for f in sorted(out.glob("chunk-*.npz")):
        z = np.load(f)
        feats.update(zip(z["ids"].tolist(), z["feats"], strict=True))
    return feats


def cost_of(lm: str, work: Path) -> dict[str, Any]:
    """Per prompt, as extracted (bfloat16, batches of 8 sorted by length): tokens, CPU ms and GFLOPs."""
    out = work / f"features-{lm}"
    tokens = cpu = flops = 0.0
    n = 0
    for f in out.glob("chunk-*.npz"):
        z = np.load(f)
        n += len(z["ids"])
        tokens += float(z["tokens"].sum())
        cpu += float(z["cpu_s"])
        flops += float(z["flops"])
    meta = json.loads((out / "meta.json").read_text())
    return {"prompts": n, "tokens_per_prompt": tokens / n, "cpu_ms_per_prompt": 1000 * cpu / n,
            "gflops_per_prompt": flops / n / 1e9, "layers": meta["layers"], "n_layers": meta["n_layers"],
            "hidden": meta["hidden"], "block_params": meta["block_params"], "max_tokens": meta["max_tokens"]}


def l2(x: npt.NDArray[Any]) -> F32:
    """Rows scaled to unit length (the routers compare by cosine)."""
    rows: F32 = np.asarray(x, dtype=np.float32)
    out: F32 = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return out


class Standardiser:
    """Per-dimension mean and spread of hidden states, fitted once (on llmrouter_9model's training prompts):
    a few dimensions of a language model's residual stream are orders of magnitude larger than the rest
    and would decide every cosine."""

    def __init__(self, rows: F32) -> None:
        self.mean = rows.mean(axis=0)
        self.std = rows.std(axis=0) + 1e-6

    def __call__(self, rows: F32) -> F32:
        return l2((rows - self.mean) / self.std)


def concat(a: F32, b: F32) -> F32:
    """Two unit-length feature sets side by side, each with equal weight."""
    return l2(np.hstack([a, b]))


def run_routers(data: RoutingData, x: F32, splits: list[tuple[IntArray, IntArray]]) -> dict[str, Any]:
    """Train kNN and cost-aware on each split's training rows, predict its test rows, report the metrics;
    also each router's cross-validation score on the training rows (the hyper-parameter search's best)."""
    te_all = np.concatenate([te for _, te in splits])
    preds: dict[str, tuple[F64, F64]] = {}
    chosen: dict[str, list[dict[str, Any]]] = {}
    cv: dict[str, float] = {}
    for kind in ROUTERS:
        q_parts, c_parts, cv_parts = [], [], []
        for tr, te in splits:
            fitted = train(kind, data.subset(tr), x[tr], "study", TrainOptions())
            q, c = artifact_predictions(fitted.artifact, [data.prompts[i] for i in te], x[te])
            q_parts.append(q)
            c_parts.append(c)
            sel = fitted.selection["knn" if kind == "knn" else "knn_weight"]
            cv_parts.append(max(sel.values()))
            chosen.setdefault(kind, []).append({k: fitted.artifact.meta[k] for k in ("knn", "probe_c", "knn_weight")
                                                if k in fitted.artifact.meta})
        preds[kind] = (np.vstack(q_parts), np.vstack(c_parts))
        cv[kind] = float(np.mean(cv_parts))
    costs = None if data.costs is None else data.costs[te_all]
    res = summarise(data.models, data.scores[te_all], costs, preds, chosen, len(splits))
    for kind in ROUTERS:
        r = res["routers"][kind]
        r["cv_score_on_training_rows"] = cv[kind]
        r.pop("curve", None)
        r.pop("pgr_curve", None)
        best_q = res["best_single"]["quality"]
        gap = res["oracle"]["quality"] - best_q
        r["oracle_gap_share_at_lambda0"] = (r["quality_at_lambda0"] - best_q) / gap if gap else None
    return res


def _const(x: F32) -> Callable[[], F32]:
    return lambda: x


def feature_sets(lm_feats: dict[str, dict[str, npt.NDArray[np.float16]]], prompts: list[str], names: list[str],
                 std: dict[str, Standardiser], base: dict[str, F32]) -> dict[str, Callable[[], F32]]:
    """Builders of each named feature set for `prompts` (lazily: each is a few hundred MB on big tables)."""
    out: dict[str, Callable[[], F32]] = {}
    for name in names:
        if name in base:
            out[name] = _const(base[name])
            continue
        spec, _, plus = name.partition("+")
        lm, layer, pool = spec.split(":")

        def build(lm: str = lm, layer: str = layer, pool: str = pool, plus: str = plus) -> F32:
            li, pi = int(layer), ("last", "mean").index(pool)
            keyed = lm_feats[lm]
            rows = np.stack([keyed[text_key(p)][li, pi] for p in prompts]).astype(np.float32)
            x = std[f"{lm}:{layer}:{pool}"](rows)
            return concat(x, base[plus]) if plus else x

        out[name] = build
    return out


def main() -> None:
    """Extract, embed, evaluate, write JSON and markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "turnout" / "prefill-study")
    ap.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "routing" / "prefill")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tables = {ev.table: load_table(DATA / ev.table / "data.parquet") for ev in EVALUATIONS}
    subsets = {ev.name: sampled(tables[ev.table], ev) for ev in EVALUATIONS}
    prompts = sorted({p for d in subsets.values() for p in d.prompts})
    console.print(f"{len(prompts)} distinct prompts over {len(EVALUATIONS)} evaluations")
    lm_feats = {lm: extract(prompts, lm, args.work) for lm in LMS}
    embedded: dict[str, dict[str, F32]] = {}
    embed_s: dict[str, float] = {}
    for spec, label in (("onnx", "minilm"), ("static", "static")):
        embedder = make_embedder(spec, model_cache_dir())
        t0 = time.process_time()
        x = embed_corpus(embedder, prompts, cache_dir())
        embed_s[label] = time.process_time() - t0
        embedded[label] = {text_key(p): x[i] for i, p in enumerate(prompts)}
    # Standardisation and the layer/pooling choice: llmrouter_9model's training rows only.
    lr = subsets[EVALUATIONS[0].name]
    lr_train = [lr.prompts[i] for i in eval_rows(lr, EvalOptions())[0][0]]
    std: dict[str, Standardiser] = {}
    grid: list[str] = []
    for lm in LMS:
        meta = json.loads((args.work / f"features-{lm}" / "meta.json").read_text())
        for li in range(len(meta["layers"])):
            for pool in ("last", "mean"):
                rows = np.stack([lm_feats[lm][text_key(p)][li, ("last", "mean").index(pool)]
                                 for p in lr_train]).astype(np.float32)
                std[f"{lm}:{li}:{pool}"] = Standardiser(rows)
                grid.append(f"{lm}:{li}:{pool}")
    report: dict[str, Any] = {"evaluations": {}, "feature_cost": {lm: cost_of(lm, args.work) for lm in LMS},
                              "embedding_cpu_s": embed_s, "prompts": len(prompts)}
    chosen_by_cv: dict[str, str] = {}
    for ev in EVALUATIONS:
        data = subsets[ev.name]
        base = {k: np.stack([v[text_key(p)] for p in data.prompts]) for k, v in embedded.items()}
        if ev is EVALUATIONS[0]:
            names = ["minilm", "static", *grid, *[g + "+minilm" for g in grid]]
        else:
            picks = list(chosen_by_cv.values())
            names = ["minilm", "static", *picks, *[p + "+minilm" for p in picks]]
        builders = feature_sets(lm_feats, data.prompts, names, std, base)
        groups = task_groups(data, 1) if ev.split == "cv" else {"all": np.arange(len(data))}
        results: dict[str, dict[str, Any]] = {}
        for group, idx in groups.items():
            sub = data.subset(idx)
            opts = EvalOptions(split=ev.split if ev.split != "cv" else "test")
            splits = eval_rows(sub, opts)
            for name, build in builders.items():
                t0 = time.perf_counter()
                x = build()[idx]
                results.setdefault(group, {})[name] = run_routers(sub, x, splits)
                console.print(f"{ev.name} / {group} / {name}: {_brief(results[group][name])} "
                              f"({time.perf_counter() - t0:.0f} s)")
        if ev is EVALUATIONS[0]:
            for lm in LMS:
                options = [g for g in grid if g.startswith(lm)]
                chosen_by_cv[lm] = max(options, key=lambda g: results["all"][g]["routers"]["cost_aware"]
                                       ["cv_score_on_training_rows"])
            report["chosen_by_cv"] = chosen_by_cv
        report["evaluations"][ev.name] = {"table": ev.table, "split": ev.split, "sample": ev.sample,
                                          "rows": len(data), "groups": results}
    report["layers"] = {lm: json.loads((args.work / f"features-{lm}" / "meta.json").read_text())["layers"]
                        for lm in LMS}
    write_results(args.out, report, markdown(report))
    console.print(f"wrote {args.out}.json and {args.out}.md")


def _brief(res: dict[str, Any]) -> str:
    r = res["routers"]["cost_aware"]
    parts = [f"q0={r['quality_at_lambda0']:.3f}"]
    for key in ("oracle_gap_share", "apgr"):
        if r.get(key) is not None:
            parts.append(f"{key}={r[key]:.3f}")
    return " ".join(parts)


def _num(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1%}" if pct else f"{v:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """The committed report (see `loadtest/results/routing/prefill.md`)."""
    from loadtest.prefill.report import render

    return render(report)


if __name__ == "__main__":
    main()
