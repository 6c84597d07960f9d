"""Time of one routing decision after embedding: kNN and cost-aware (kNN + probe ensemble) routers over a
10,000-prompt index with 9 models, as `route()` runs in the gateway (one request at a time).

The index holds synthetic L2-normalised 384-dim embeddings with seeded random scores and costs: the
arithmetic of a decision does not depend on the values.

    python -m loadtest.routing_bench [--index 10000] [--calls 2000] [--out loadtest/results/routing/decision]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from loadtest.results_io import write_results
from routers.base import RoutingRequest
from routers.learned import UtilityRouter
from routers.predictors import EnsemblePredictor, KnnIndex, KnnPredictor, ProbePredictor

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    """Build the routers, time `route()` and write JSON + markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--index", type=int, default=10_000)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "routing" / "decision")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, d, m = args.index, 384, 9
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores = (rng.uniform(size=(n, m)) > 0.5).astype(np.float64)
    costs = rng.uniform(1e-5, 3e-4, size=(n, m))
    models = [f"model-{j}" for j in range(m)]
    knn = KnnPredictor(KnnIndex(x, scores, costs), k=160, weighting="uniform")
    probe = ProbePredictor(rng.normal(size=(m, d)) * 0.1, np.zeros(m))
    routers = {
        "knn": UtilityRouter("knn", "knn", knn, models, cost_ref=3e-4, lam=0.5),
        "cost_aware (kNN + probe)": UtilityRouter("ca", "cost_aware", EnsemblePredictor(knn, probe, 0.75), models,
                                                  cost_ref=3e-4, lam=0.5),
    }
    queries = rng.normal(size=(args.calls, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    results = {}
    for name, router in routers.items():
        for q in queries[:100]:  # warm-up
            router.route(RoutingRequest("w", "", tuple(models), embedding=q))
        times = []
        for i, q in enumerate(queries):
            t = time.perf_counter()
            router.route(RoutingRequest(str(i), "", tuple(models), embedding=q))
            times.append((time.perf_counter() - t) * 1000)
        results[name] = {"median_ms": float(np.median(times)), "p99_ms": float(np.percentile(times, 99)),
                         "calls": args.calls}
    out = {"index": n, "dim": d, "models": m, "cpus": os.cpu_count(), "results": results}
    lines = [f"# One routing decision after embedding ({n:,}-prompt index, {m} models, {d}-dim)", "",
             "Command: `python -m loadtest.routing_bench`. Synthetic normalised embeddings; one decision at a",
             "time, as in the gateway. Target: <= 1 ms.", "", "| router | median ms | p99 ms |", "|---|---|---|"]
    lines += [f"| {k} | {v['median_ms']:.3f} | {v['p99_ms']:.3f} |" for k, v in results.items()]
    write_results(args.out, out, "\n".join(lines))


if __name__ == "__main__":
    main()
