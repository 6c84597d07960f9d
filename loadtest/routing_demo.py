"""`make demo`: routing live traffic over nine replayed models of the bundled `llmrouter_9model` table.

What it does, start to end:
1. trains a `cost_aware` router on the table's training split with the default (static) embedder (`turnout
   train`'s own code; embeddings and the artifact are cached under ~/.cache/turnout, so a second run skips
   this);
2. starts one replay worker per model (`loadtest.replay_worker`: an OpenAI-compatible server that answers
   with a labelled replay text, token counts and a latency like the model's size; no language model runs);
3. starts the gateway with three policies: `best-single` (always the model with the best training score),
   `quality-first` (the router at lambda 0) and `balanced` (the router with lambda set from a target mean
   cost of 40% of the best single model's);
4. sends the table's test prompts (those not also in train) through the gateway with the `openai` SDK under
   each policy, and reads each answer's model, usage and routing headers;
5. prints each policy's quality (the table's score for the model that answered), cost (usage x list
   prices), savings against always using the best single model, and routing overhead; writes JSON and a
   plot under `loadtest/results/demo/`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import yaml
from rich.console import Console
from rich.table import Table

from routers.artifacts import ArtifactError, load_artifact
from routers.embedding.static import STATIC_ID
from routers.offline.commands import run_train
from routers.offline.dataset import RoutingData, load_table
from routers.offline.splits import dedupe_within, train_test
from testkit.engines import BUNDLED_TABLE, PY_ENV, REPO, VLLM_CACHE, gateway_process
from testkit.procs import ManagedProcess, free_port

TABLE = BUNDLED_TABLE
OUT = REPO / "loadtest" / "results" / "demo"
CONCURRENCY = 16
MAX_TOKENS = 64
BALANCED_COST_SHARE = 0.4


@dataclass
class Answer:
    """One routed request as the client saw it."""

    prompt: int  # row of the table
    worker: str
    prompt_tokens: int
    completion_tokens: int
    routing_ms: float | None
    overhead_ms: float
    latency_ms: float


def prices_of(table: Path) -> dict[str, tuple[float, float]]:
    """Model -> (input, output) USD per 1M tokens, from the models.json beside the table."""
    meta = json.loads((table.parent / "models.json").read_text())
    return {m: (float(p["input_price"]), float(p["output_price"]))
            for m, p in meta["prices_usd_per_1M_tokens"].items()}


def trained_artifact(table: Path, data: RoutingData, console: Console) -> Path:
    """The demo's cost_aware artifact for this table (trained once, then reused while the table is unchanged)."""
    out = VLLM_CACHE / "demo-artifacts" / f"cost_aware-{data.data_hash[:12]}"
    try:
        load_artifact(out, embedder_id=STATIC_ID, models=data.models)
        console.print(f"reusing the trained router in {out}")
        return out
    except ArtifactError:
        pass
    console.print("training a cost_aware router on the training split (first run only; embeddings are cached)")
    run_train(table, "cost_aware", out, "static", console)
    return out


def worker_name(model: str) -> str:
    """A worker name for a table model (config names allow letters, digits, `_ . : -`)."""
    return "".join(ch if ch.isalnum() or ch in "_.:-" else "-" for ch in model)


def replay_process(table: Path, model: str, port: int, log: Path, speed: float) -> ManagedProcess:
    """A replay worker for `model` (not yet started)."""
    return ManagedProcess(
        [sys.executable, "-m", "loadtest.replay_worker", "--table", str(table), "--model", model,
         "--port", str(port), "--speed", str(speed)],
        ready_url=f"http://127.0.0.1:{port}/health", log_path=log, env=PY_ENV, cwd=REPO, timeout_s=60)


def gateway_config(models: list[str], ports: dict[str, int], prices: dict[str, tuple[float, float]],
                   artifact: Path, best: str, balanced_cost: float) -> dict[str, Any]:
    """Workers (one per replayed model, list prices), and the three demo policies."""
    workers = [{"name": worker_name(m), "model": m, "base_url": f"http://127.0.0.1:{ports[m]}/v1",
                "price": {"input_per_1m": prices[m][0], "output_per_1m": prices[m][1]}} for m in models]
    return {
        "workers": workers,
        "policies": {
            "best-single": {"type": "fixed", "worker": worker_name(best),
                            "description": "always the model with the best training score"},
            "quality-first": {"type": "cost_aware", "artifact": str(artifact), "lambda": 0.0},
            "balanced": {"type": "cost_aware", "artifact": str(artifact),
                         "target": {"max_cost_usd": balanced_cost}, "shadow": "best-single"},
        },
        "default_policy": "balanced",
        "server": {"health_interval_s": 2.0},
    }


async def send_all(base_url: str, policy: str, prompts: list[tuple[int, str]]) -> list[Answer]:
    """Every prompt through the gateway under `policy`, CONCURRENCY at a time."""
    sem = asyncio.Semaphore(CONCURRENCY)
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="demo", max_retries=0, timeout=60) as client:

        async def one(row: int, text: str) -> Answer:
            async with sem:
                t = time.perf_counter()
                raw = await client.chat.completions.with_raw_response.create(
                    model=f"turnout/{policy}", messages=[{"role": "user", "content": text}], max_tokens=MAX_TOKENS)
                latency = (time.perf_counter() - t) * 1000
                usage = raw.parse().usage
                assert usage is not None
                routing = raw.headers.get("x-turnout-routing-ms")
                return Answer(row, raw.headers["x-turnout-model"], usage.prompt_tokens, usage.completion_tokens,
                              float(routing) if routing else None, float(raw.headers["x-turnout-overhead-ms"]),
                              latency)

        return await asyncio.gather(*(one(r, t) for r, t in prompts))


def summarise(data: RoutingData, answers: list[Answer], by_worker: dict[str, str],
              prices: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """Quality (table score of the model that answered), cost (usage x prices), overheads, and the mix."""
    col = {m: j for j, m in enumerate(data.models)}
    quality, cost = [], []
    mix: dict[str, int] = {}
    for a in answers:
        model = by_worker[a.worker]
        quality.append(float(np.nan_to_num(data.scores[a.prompt, col[model]])))
        p_in, p_out = prices[model]
        cost.append((a.prompt_tokens * p_in + a.completion_tokens * p_out) / 1e6)
        mix[model] = mix.get(model, 0) + 1
    routing = [a.routing_ms for a in answers if a.routing_ms is not None]
    return {
        "requests": len(answers), "quality": float(np.mean(quality)), "cost_usd_per_request": float(np.mean(cost)),
        "routing_ms_p50": float(np.median(routing)) if routing else None,
        "routing_ms_p99": float(np.percentile(routing, 99)) if routing else None,
        "overhead_ms_p50": float(np.median([a.overhead_ms for a in answers])),
        "latency_ms_p50": float(np.median([a.latency_ms for a in answers])),
        "mix": dict(sorted(mix.items(), key=lambda kv: -kv[1])),
    }


def single_models(data: RoutingData, rows: list[int], prompts: list[tuple[int, str]],
                  prices: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
    """Each model alone on the same prompts, costed with the replay workers' token counts."""
    from loadtest.replay_worker import ANSWER_TOKENS, prompt_tokens_of

    tokens = np.array([prompt_tokens_of(t) for _, t in prompts], dtype=np.float64)
    out = {}
    for j, m in enumerate(data.models):
        p_in, p_out = prices[m]
        out[m] = {"quality": float(np.nanmean(np.nan_to_num(data.scores[rows, j]))),
                  "cost_usd_per_request": float(np.mean(tokens * p_in + min(ANSWER_TOKENS, MAX_TOKENS) * p_out) / 1e6)}
    return out


def plot(path: Path, results: dict[str, Any], singles: dict[str, dict[str, float]]) -> None:
    """Cost against quality: the single models and each policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for m, s in singles.items():
        ax.scatter(s["cost_usd_per_request"] * 1e6, s["quality"], color="grey", s=25)
        ax.annotate(m, (s["cost_usd_per_request"] * 1e6, s["quality"]), fontsize=7, color="grey",
                    xytext=(3, 3), textcoords="offset points")
    for name, r in results.items():
        ax.scatter(r["cost_usd_per_request"] * 1e6, r["quality"], s=70, marker="D", label=f"policy {name}")
    ax.set_xlabel("cost per request (USD per 1M requests)")
    ax.set_ylabel("quality (table score of the answering model)")
    ax.set_title("Turnout demo: llmrouter_9model test prompts through the gateway")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(console: Console, results: dict[str, Any], best: str) -> None:
    """The policies' quality/cost table."""
    base = results["best-single"]["cost_usd_per_request"]
    table = Table(title=f"{results['best-single']['requests']} test prompts per policy (best single model: {best})")
    for col in ("policy", "quality", "cost $/1k req", "savings vs best single", "routing ms p50 / p99",
                "gateway overhead ms p50", "models used (top 3)"):
        table.add_column(col, justify="left" if col in ("policy", "models used (top 3)") else "right")
    for name, r in results.items():
        top = ", ".join(f"{m} {n}" for m, n in list(r["mix"].items())[:3])
        routing = "-" if r["routing_ms_p50"] is None else f"{r['routing_ms_p50']:.2f} / {r['routing_ms_p99']:.2f}"
        table.add_row(name, f"{r['quality']:.3f}", f"{r['cost_usd_per_request'] * 1000:.4f}",
                      f"{(1 - r['cost_usd_per_request'] / base) * 100:.0f}%", routing, f"{r['overhead_ms_p50']:.2f}",
                      top)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--speed", type=float, default=1.0, help="replay latency divisor (2 = twice as fast)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many test prompts (0 = all)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    console = Console(width=None if Console().is_terminal else 160)
    started = time.perf_counter()
    data = load_table(args.table)
    prices = prices_of(args.table)
    train_rows, test_rows = train_test(data)  # test prompts that also occur in train are left out
    prompts = [(int(i), data.prompts[i]) for i in dedupe_within(data, test_rows)]
    if args.limit:
        prompts = prompts[: args.limit]
    rows = [r for r, _ in prompts]
    best = data.models[int(np.argmax(np.nanmean(data.scores[train_rows], axis=0)))]
    artifact = trained_artifact(args.table, data, console)
    singles = single_models(data, rows, prompts, prices)
    balanced_cost = BALANCED_COST_SHARE * singles[best]["cost_usd_per_request"]
    by_worker = {worker_name(m): m for m in data.models}
    with tempfile.TemporaryDirectory(prefix="turnout-demo-") as tmp_dir:
        tmp = Path(tmp_dir)
        ports = {m: free_port() for m in data.models}
        procs = [replay_process(args.table, m, ports[m], tmp / f"replay-{worker_name(m)}.log", args.speed)
                 for m in data.models]
        cfg_path = tmp / "turnout.yaml"
        cfg_path.write_text(yaml.safe_dump(gateway_config(data.models, ports, prices, artifact, best, balanced_cost)))
        gw_port = free_port()
        gateway = gateway_process(cfg_path, gw_port, tmp / "gateway.log", log_level="warning")
        console.print(f"starting {len(procs)} replay workers and the gateway")
        for p in procs:
            p.start()
        try:
            with gateway:
                url = f"http://127.0.0.1:{gw_port}"
                results = {}
                for policy in ("best-single", "quality-first", "balanced"):
                    t = time.perf_counter()
                    answers = asyncio.run(send_all(url, policy, prompts))
                    results[policy] = summarise(data, answers, by_worker, prices)
                    console.print(f"  {policy}: {len(answers)} requests in {time.perf_counter() - t:.1f} s")
        finally:
            for p in procs:
                p.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    report(console, results, best)
    payload = {"table": str(args.table), "prompts": len(prompts), "best_single": best, "policies": results,
               "singles": singles, "balanced_target_cost_usd": balanced_cost,
               "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "routing_demo.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(args.out / "routing_demo.png", results, singles)
    console.print(f"wrote {args.out / 'routing_demo.json'} and {args.out / 'routing_demo.png'} "
                  f"({payload['seconds']} s in all)")


if __name__ == "__main__":
    main()
