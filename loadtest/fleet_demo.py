"""`make demo-fleet`: routing trained on a fleet of two real models, from prompts to live traffic.

Two vLLM CPU workers of different sizes serve SmolLM2-135M-Instruct (`small`) and Gemma 3 270M (`big`), each
on its own core. Then, with the `turnout` commands a user runs:
1. `turnout collect`: a few dozen prompts of the bundled suite (short-answer questions and grade-school
   arithmetic), sent to both models;
2. `turnout grade`: each answer scored by its task's reference grader into a routing table;
3. `turnout train` and `turnout eval`: a `cost_aware` router on that table, and its report against the best
   single model of this fleet;
4. `turnout promote`: a config serving the router as the default policy, which a gateway then serves while
   the same prompts go through it with the `openai` SDK; every live decision is compared with the decision
   the artifact makes offline on the same text.
It prints the collected table's summary, the evaluation and the live routing, and writes them (with each
step's time) under `loadtest/results/fleet/`.

    python -m loadtest.fleet_demo [--prompts 40] [--max-tokens 32] [--out loadtest/results/fleet/fleet] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pandas as pd
import yaml

from loadtest.results_io import write_results
from routers.artifacts import load_artifact
from routers.base import RoutingRequest
from routers.embedding.factory import make_embedder
from routers.from_artifact import router_from_artifact
from testkit.engines import PY_ENV, REPO, gateway_process, has_avx2, vllm_process, vllm_ready
from testkit.procs import ManagedProcess, free_port

OUT = REPO / "loadtest" / "results" / "fleet" / "fleet"  # fleet.json and fleet.md
#: Worker name -> (served model, the model built by deploy/vllm-cpu/setup.sh, USD per 1M tokens in / out).
#: The prices are illustrative, in proportion to the models' sizes; the costs in the report follow from them.
FLEET = {"small": ("smollm2-135m", "smollm2-135m", (0.05, 0.10)),
         "big": ("gemma3-270m", "gemma3-270m", (0.20, 0.40))}
TASKS = "natural_qa,trivia_qa,gsm8k,agentverse-mgsm"


@dataclass
class Steps:
    """Each step's wall time, in order."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the block as step `name`."""
        t = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - t, 1)


@contextmanager
def fleet(work: Path) -> Iterator[dict[str, str]]:
    """Both vLLM workers, started at once on cores 0 and 1; yields worker name -> base URL."""
    procs: dict[str, tuple[str, ManagedProcess]] = {}
    for core, (name, (served, model, _)) in enumerate(FLEET.items()):
        port = free_port()
        procs[name] = (f"http://127.0.0.1:{port}/v1",
                       vllm_process(port, work / f"vllm-{name}.log", name=served, cores=str(core), model=model))
    with ExitStack() as stack:
        for _, proc in procs.values():
            stack.push(proc)
        with ThreadPoolExecutor(max_workers=len(procs)) as pool:
            for f in [pool.submit(proc.start) for _, proc in procs.values()]:
                f.result()
        yield {name: url for name, (url, _) in procs.items()}


def fleet_config(urls: dict[str, str]) -> dict[str, Any]:
    """The gateway config of the fleet: its two workers with their prices, always-big as the default."""
    workers = [{"name": name, "model": served, "base_url": urls[name],
                "health_url": urls[name].removesuffix("/v1") + "/health",
                "price": {"input_per_1m": p_in, "output_per_1m": p_out}}
               for name, (served, _, (p_in, p_out)) in FLEET.items()]
    return {"workers": workers, "policies": {"always-big": {"type": "fixed", "worker": "big"}},
            "default_policy": "always-big", "upstream": {"total_timeout_s": 300}}


def turnout(*args: str, cwd: Path) -> str:
    """Run a `turnout` command as a user would; its output, or RuntimeError with it."""
    done = subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, env={**PY_ENV, "COLUMNS": "150"},
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"turnout {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def collect_grade_train(work: Path, cfg: Path, prompts: int, max_tokens: int, steps: Steps) -> dict[str, Any]:
    """Steps 1-3: the run directory, its table, the artifact and the evaluation report."""
    with steps.timed("collect"):
        turnout("collect", "--config", str(cfg), "--prompts", "bundled:llmrouter", "--tasks", TASKS,
                "--sample", str(prompts), "--max-tokens", str(max_tokens), "--concurrency", "4",
                "--out", str(work / "run"), cwd=work)
    with steps.timed("grade"):
        turnout("grade", str(work / "run"), "--no-keep-split", cwd=work)
    table = work / "run" / "table.parquet"
    with steps.timed("train"):
        turnout("train", "--data", str(table), "--router", "cost_aware", "--out", str(work / "artifact"), cwd=work)
    with steps.timed("eval"):
        turnout("eval", "--data", str(table), "--router", "cost_aware", "--folds", "5", "--json",
                str(work / "eval.json"), cwd=work)
    report: dict[str, Any] = json.loads((work / "eval.json").read_text())
    return report


def served_live(work: Path, cfg: Path, max_tokens: int, steps: Steps) -> dict[str, Any]:
    """Step 4: the router as the default policy of a gateway; the run's prompts through it, each live decision
    beside the artifact's own decision offline."""
    with steps.timed("promote"):
        turnout("promote", "--config", str(cfg), "--artifact", str(work / "artifact"), "--name", "routed",
                "--lambda", "0", "--default", "--out", str(work / "routed.yaml"), cwd=work)
    texts = [json.loads(line)["text"] for line in (work / "run" / "prompts.jsonl").read_text().splitlines()]
    port = free_port()
    artifact = load_artifact(work / "artifact")
    embedder = make_embedder("onnx")
    router = router_from_artifact("routed", artifact, lam=0.0, embedder=embedder)
    offline = [router.route(RoutingRequest(request_id=str(i), text=t, candidates=tuple(artifact.models),
                                           embedding=embedder.embed([t])[0])).chosen for i, t in enumerate(texts)]
    with steps.timed("serve"), gateway_process(work / "routed.yaml", port, work / "gateway.log"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", max_retries=0)
        live = []
        for t in texts:
            raw = client.chat.completions.with_raw_response.create(
                model="auto", max_tokens=max_tokens, messages=[{"role": "user", "content": t}])
            live.append((raw.headers["x-turnout-model"], raw.parse().usage))
    models = {name: served for name, (served, _, _) in FLEET.items()}
    chosen = [models[w] for w, _ in live]
    return {"prompts": len(texts), "mix": dict(Counter(chosen)),
            "agree_with_offline": sum(a == b for a, b in zip(chosen, offline, strict=True)),
            "offline_mix": dict(Counter(offline))}


def table_summary(work: Path) -> dict[str, Any]:
    """The collected table: per model, answers scored, mean score, cost, and the answers' latency."""
    df = pd.read_parquet(work / "run" / "table.parquet")
    out: dict[str, Any] = {"prompts": len(df), "tasks": dict(Counter(df["task"]))}
    answers = [json.loads(line) for line in (work / "run" / "answers.jsonl").read_text().splitlines()]
    for name, (served, _, _) in FLEET.items():
        mine = [a for a in answers if a["model"] == served and a["error"] is None]
        col = df[f"score__{served}"]
        out[served] = {"worker": name, "answers": len(mine), "scored": int(col.notna().sum()),
                       "mean_score": round(float(col.mean()), 4), "cost_usd": sum(a["cost_usd"] for a in mine),
                       "completion_tokens": sum(a["completion_tokens"] for a in mine),
                       "prompt_tokens": sum(a["prompt_tokens"] for a in mine),
                       "latency_s_median": round(float(pd.Series([a["latency_s"] for a in mine]).median()), 3),
                       "ttft_s_median": round(float(pd.Series([a["ttft_s"] for a in mine]).median()), 3)}
    return out


def markdown(results: dict[str, Any]) -> str:
    """The committed report."""
    lines = ["# Routing trained on a two-model fleet", "", f"Command: `{results['command']}`", "",
             "Collected table (per model):", "", "| model | answers | mean score | prompt tokens | completion "
             "tokens | cost USD | latency s p50 | TTFT s p50 |", "|---|---|---|---|---|---|---|---|"]
    for served, _, _ in FLEET.values():
        m = results["table"][served]
        lines.append(f"| {served} | {m['answers']} | {m['mean_score']} | {m['prompt_tokens']} | "
                     f"{m['completion_tokens']} | {m['cost_usd']:.8f} | {m['latency_s_median']} | "
                     f"{m['ttft_s_median']} |")
    live = results["live"]
    ev = results["eval"]
    best, oracle = ev["best_single"], ev["oracle"]
    routed = ev["routers"]["cost_aware"]
    dear = max(FLEET.values(), key=lambda f: sum(f[2]))[0]
    dear_cost = ev["groups"]["all"]["singles"][dear]["cost"]
    lines += ["", "Evaluation (`turnout eval --folds 5`, mean per prompt):", "",
              f"- best single model: {best['model']}, quality {best['quality']:.3f}, cost ${best['cost']:.3g}",
              f"- oracle: quality {oracle['quality']:.3f}, cost ${oracle['cost']:.3g}",
              f"- cost_aware at lambda 0: quality {routed['quality_at_lambda0']:.3f}, cost "
              f"${routed['cost_at_lambda0']:.3g} ({1 - routed['cost_at_lambda0'] / dear_cost:.0%} less than always "
              f"{dear}, the dearest model, at ${dear_cost:.3g})",
              f"- two-model metrics: APGR {routed.get('apgr')}"
              + (f" ({routed['note']})" if routed.get("note") else ""),
              "",
              f"Live routing of the {live['prompts']} prompts: {live['mix']}; the artifact offline: "
              f"{live['offline_mix']}; live decisions equal to offline: {live['agree_with_offline']} of "
              f"{live['prompts']}.", "", "Step times (s): " + ", ".join(f"{k} {v}" for k, v in
                                                                         results["seconds"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    """Run the demo (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m loadtest.fleet_demo")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--work", type=Path, default=None, help="keep the run, table and artifact here")
    args = ap.parse_args()
    if not has_avx2() or not vllm_ready("smollm2-135m") or not vllm_ready("gemma3-270m"):
        sys.exit("the fleet demo needs both vLLM CPU models (AVX2 and `make vllm`)")
    steps = Steps()
    with tempfile.TemporaryDirectory(prefix="turnout-fleet-") as tmp, ExitStack() as stack:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        with steps.timed("start workers"):
            urls = stack.enter_context(fleet(work))
        cfg = work / "fleet.yaml"
        cfg.write_text(yaml.safe_dump(fleet_config(urls)))
        evaluation = collect_grade_train(work, cfg, args.prompts, args.max_tokens, steps)
        live = served_live(work, cfg, args.max_tokens, steps)
        summary = table_summary(work)
    command = f"python -m loadtest.fleet_demo --prompts {args.prompts} --max-tokens {args.max_tokens}"
    results = {"command": command, "table": summary, "eval": evaluation, "live": live, "seconds": steps.seconds}
    write_results(args.out, results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
