"""Side by side, in one run on one machine, against the same upstream: direct to the worker, a bare Python
proxy on Turnout's own stack (`loadtest.bare_proxy`), Turnout with the `fixed` policy, Turnout routing every
request with the `cost_aware` policy (kNN and a probe over static-embedder prompt vectors; every prompt new, so no
cache is hit), the LiteLLM proxy (simple-shuffle, no routing), the Portkey gateway (Node, from npm) and
`vllm-router` (Rust, from PyPI; round robin over the one worker). Open-loop load (`loadtest.openloop`, an
aiohttp client whose own CPU is reported) at rising rates until each engine saturates; the engines take turns
at each rate, in an order rotated at every rate. Non-streamed or, with `--stream`, every request streamed.

An engine sustains a rate when fewer than 1% of its requests fail, its p99 latency is within 2x of direct's at
that rate, and it completes at least 95% of the offered rate; it stops after two rates in a row it did not
sustain, and its highest sustained rate is the highest it sustained. Added latency = the engine's percentile minus
direct's at the same rate; for streams, the gaps between two chunks are compared the same way.

Two upstreams, one per run (`--upstream`):
- `fake`: one light fake worker process (`loadtest.fast_upstream`) answering every model: a whole answer after
  50 ms, or a stream's first token after `--ttft-ms` and one more every `--itl-ms`, so the routed gateway's
  nine models and the others' one are the same process;
- `vllm`: the real vLLM CPU worker (gemma3-270m, see deploy/vllm-cpu), serving under its own name and under the
  nine model names the routed gateway's artifact knows (vLLM answers to each name it is given); every request asks
  for exactly `max_tokens` tokens (`ignore_eos`), so all engines carry the same work.

    python -m loadtest.sidebyside [--upstream fake|vllm] [--stream] [--rates 25,50,...] [--step-s 15] \\
        [--max-tokens 16] [--itl-ms 10] [--engines direct,bare-proxy,turnout-fixed,...] [--out PATH]

Many long streams (the streams benchmark): `--stream --max-tokens 200 --itl-ms 20 --rates 5,10,25,50`
(200 tokens at 50 tokens/s each, so 20 to 200 streams open at once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop
import yaml

from loadtest.openloop import Scenario, run
from loadtest.results_io import write_results
from loadtest.routing_overhead import ensure_artifacts, make_pools
from loadtest.soak import rss_mb
from routers.offline.dataset import load_table
from testkit.engines import (
    BUNDLED_TABLE,
    PY_ENV,
    REPO,
    gateway_process,
    has_avx2,
    table_prices,
    vllm_process,
    vllm_ready,
)
from testkit.procs import ManagedProcess, free_port

CACHE = Path(os.environ.get("TURNOUT_CACHE", Path.home() / ".cache" / "turnout"))
LITELLM_VENV = CACHE / "litellm-venv"
VLLM_ROUTER_VENV = CACHE / "vllm-router-venv"
PORTKEY_DIR = CACHE / "portkey-gateway"
ENGINES = ("direct", "bare-proxy", "turnout-fixed", "turnout-routed", "litellm", "portkey", "vllm-router")
#: The engines each setup script installs (once per machine, under `CACHE`).
SETUP = {"litellm": "litellm-setup.sh", "portkey": "portkey-setup.sh", "vllm-router": "vllm-router-setup.sh"}
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
    engines: tuple[str, ...] = ENGINES  # the default `--engines`


UPSTREAMS = {
    "fake": Upstream("fake", "25,50,100,200,300,400,600,800,1000", 15.0, "", {}),
    # This CPU's vLLM build answers about 0.5 requests/s (16 tokens, 1.5-2 s each, no faster in batches).
    "vllm": Upstream("vllm", "0.25,0.5", 90.0,
                     f"the vLLM CPU worker ({VLLM_MODEL}, bfloat16, prefix caching off, compute threads on core 0), "
                     f"exactly the asked tokens per answer (`ignore_eos`), the pool's prompts of at most 400 "
                     "characters",
                     {"ignore_eos": True}, max_prompt_chars=400,
                     # The Portkey gateway drops fields OpenAI does not define (`ignore_eos`), so its answers would be
                     # shorter than the others'; at 0.5 requests/s the peers built for speed have nothing to show.
                     engines=("direct", "turnout-fixed", "turnout-routed", "litellm")),
}


@dataclass
class Engine:
    """One way to reach the upstream: its URL, the model name it is asked for, its process (None: direct), and
    what each request carries."""

    name: str
    url: str
    model: str
    proc: ManagedProcess | None
    api_key: str = "x"
    headers: dict[str, str] = field(default_factory=dict)
    unique_prompts: bool = False  # a routed engine gets a new prompt every request


def litellm_process(config: Path, port: int, key: str, log: Path) -> ManagedProcess:
    """The LiteLLM proxy from its own virtualenv (`loadtest/litellm-setup.sh`), quiet and offline."""
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": key, "LITELLM_LOG": "ERROR",
           "HOST": "", "PORT": ""}
    return ManagedProcess([str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
                           "--port", str(port)], ready_url=f"http://127.0.0.1:{port}/health/liveliness", env=env,
                          log_path=log, timeout_s=180)


def bare_proxy_process(upstream_url: str, port: int, log: Path) -> ManagedProcess:
    """`loadtest.bare_proxy` in front of the upstream."""
    return ManagedProcess([sys.executable, "-m", "loadtest.bare_proxy", "--port", str(port), "--upstream",
                           upstream_url], ready_url=f"http://127.0.0.1:{port}/health", env=PY_ENV, cwd=REPO,
                          log_path=log, timeout_s=30)


def portkey_process(upstream_url: str, port: int, log: Path) -> tuple[ManagedProcess, dict[str, str]]:
    """The Portkey gateway (`loadtest/portkey-setup.sh`), headless; each request names the upstream as an
    OpenAI-compatible custom host. It binds every interface (it has no host flag)."""
    proc = ManagedProcess([str(PORTKEY_DIR / "node_modules" / ".bin" / "gateway"), f"--port={port}", "--headless"],
                          ready_url=f"http://127.0.0.1:{port}/", env={"NODE_ENV": "production"}, log_path=log,
                          timeout_s=60)
    return proc, {"x-portkey-provider": "openai", "x-portkey-custom-host": upstream_url}


def vllm_router_process(upstream_url: str, port: int, log: Path) -> tuple[ManagedProcess, dict[str, str]]:
    """vllm-router (`loadtest/vllm-router-setup.sh`), round robin over the one worker, no retries (as the other
    engines), its Prometheus endpoint on a port of its own."""
    worker = upstream_url.removesuffix("/v1")  # it appends the API's paths itself
    proc = ManagedProcess([str(VLLM_ROUTER_VENV / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
                           "--worker-urls", worker, "--policy", "round_robin", "--disable-retries",
                           "--prometheus-port", str(free_port()), "--log-level", "warning"],
                          ready_url=f"http://127.0.0.1:{port}/health", log_path=log, timeout_s=60)
    return proc, {}


#: Peers started from their own installs; each also says the headers its requests carry.
PEERS: dict[str, Callable[[str, int, Path], tuple[ManagedProcess, dict[str, str]]]] = {
    "portkey": portkey_process, "vllm-router": vllm_router_process}


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
              "default_policy": "cost_aware"}
    litellm = {"model_list": [{"model_name": model, "litellm_params": {"model": f"openai/{model}",
                                                                        "api_base": upstream_url, "api_key": "x"}}],
               "router_settings": {"routing_strategy": "simple-shuffle", "num_retries": 0},
               "litellm_settings": {"telemetry": False, "drop_params": True}, "general_settings": {}}
    paths = {}
    for name, cfg in (("turnout-fixed", fixed), ("turnout-routed", routed), ("litellm", litellm)):
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
    # SIGTERM ends the run as Ctrl-C does, through the exit stack, so no engine or upstream outlives it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", choices=sorted(UPSTREAMS), default="fake")
    ap.add_argument("--stream", action="store_true", help="stream every request")
    ap.add_argument("--rates", default=None, help="comma-separated requests/s (default: the upstream's)")
    ap.add_argument("--step-s", type=float, default=None, help="seconds of load per engine and rate")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    ap.add_argument("--ttft-ms", type=float, default=50.0, help="the fake's time to a stream's first token")
    ap.add_argument("--itl-ms", type=float, default=10.0, help="the fake's time between a stream's tokens")
    ap.add_argument("--engines", default=None, help="comma-separated (default: the upstream's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    up = UPSTREAMS[args.upstream]
    args.rates = args.rates if args.rates is not None else up.rates
    args.step_s = args.step_s if args.step_s is not None else up.step_s
    rates = [float(r) for r in args.rates.split(",")]
    args.engines = args.engines if args.engines is not None else ",".join(up.engines)
    names = [e for e in args.engines.split(",") if e]
    unknown = set(names) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}: expected some of {', '.join(ENGINES)}")
    suffix = "-stream" if args.stream else ""
    out = args.out or REPO / "loadtest" / "results" / f"sidebyside-{up.name}{suffix}"
    if up.name == "vllm" and not (has_avx2() and vllm_ready()):
        raise SystemExit("the vLLM CPU worker is not available: it needs AVX2 and `make vllm`")
    for name in names:
        if name in SETUP:
            subprocess.run(["bash", str(REPO / "loadtest" / SETUP[name])], check=True)
    data = load_table(BUNDLED_TABLE)
    artifact = ensure_artifacts(BUNDLED_TABLE, data, False, "static")["cost_aware"]["path"]
    models = sorted(data.models)
    prices = table_prices(BUNDLED_TABLE, models)
    prompts = [p for p in make_pools(data, 1).mixed if len(p) <= (up.max_prompt_chars or len(p))][:2000]
    tmp = Path(tempfile.mkdtemp(prefix="turnout-sidebyside-"))
    key = "sk-bench-" + secrets.token_hex(16)
    description = ("one light fake worker (`loadtest.fast_upstream`): "
                   + (f"a stream's first token after {args.ttft_ms:g} ms, then one every {args.itl_ms:g} ms"
                      if args.stream else f"a whole answer after {FAKE_LATENCY_MS} ms")
                   if up.name == "fake" else up.description)

    with contextlib.ExitStack() as stack:
        up_port = free_port()
        upstream_proc: ManagedProcess | None = None
        if up.name == "fake":
            upstream_proc = stack.enter_context(ManagedProcess(
                [sys.executable, "-m", "loadtest.fast_upstream", "--port", str(up_port), "--latency-ms",
                 str(FAKE_LATENCY_MS), "--ttft-ms", str(args.ttft_ms), "--itl-ms", str(args.itl_ms)],
                ready_url=f"http://127.0.0.1:{up_port}/health", env=PY_ENV, cwd=REPO, log_path=tmp / "fake.log",
                timeout_s=30))
            model = "fake-model"
        else:
            print("starting the vLLM CPU worker (about a minute)", flush=True)
            # Prefix caching off: the engines send the same prompts in turn, and a cache would favour all but the
            # first (its prefills were done already).
            # Its compute threads on core 0: left to roam, they spin on both cores and starve the gateways of CPU
            # at random (it answers no faster on two cores here).
            upstream_proc = stack.enter_context(vllm_process(
                up_port, tmp / "vllm.log", name=",".join([VLLM_MODEL, *models]), cores="0",
                args=("--no-enable-prefix-caching",)))
            model = VLLM_MODEL
        upstream_url = f"http://127.0.0.1:{up_port}/v1"
        paths = engine_configs(tmp, upstream_url, model, models, prices, artifact)
        engines: dict[str, Engine] = {"direct": Engine("direct", upstream_url, model, None)}
        for name in names:
            if name == "direct":
                continue
            port = free_port()
            log = tmp / f"{name}.log"
            if name == "litellm":
                engines[name] = Engine(name, f"http://127.0.0.1:{port}/v1", model,
                                       stack.enter_context(litellm_process(paths[name], port, key, log)), key)
            elif name == "bare-proxy":
                engines[name] = Engine(name, f"http://127.0.0.1:{port}/v1", model,
                                       stack.enter_context(bare_proxy_process(upstream_url, port, log)))
            elif name in PEERS:
                proc, headers = PEERS[name](upstream_url, port, log)
                engines[name] = Engine(name, f"http://127.0.0.1:{port}/v1", model, stack.enter_context(proc),
                                       headers=headers)
            else:
                proc = gateway_process(paths[name], port, log, log_level="warning")
                engines[name] = Engine(name, f"http://127.0.0.1:{port}/v1", "auto", stack.enter_context(proc),
                                       unique_prompts=name == "turnout-routed")
        if up.extra_body:
            check_same_work(engines, up.extra_body, args.max_tokens)

        def scenario(e: Engine, name: str, rate: float, duration_s: float, seed: int) -> Scenario:
            return Scenario(name=name, model=e.model, rate=rate, duration_s=duration_s, max_tokens=args.max_tokens,
                            prompts=prompts, api_key=e.api_key, headers=e.headers, seed=seed,
                            unique_prompts=e.unique_prompts, stream_share=1.0 if args.stream else 0.0,
                            extra_body=up.extra_body)

        # Warm-up: first requests pay for lazy imports (LiteLLM's take seconds).
        for e in engines.values():
            uvloop.run(run(e.url, scenario(e, "warmup", min(10.0, rates[0]), 5, 1000)))
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
                cpu0 = tree_cpu_s(e.proc.pid) if e.proc is not None else 0.0
                up0 = tree_cpu_s(upstream_proc.pid)
                res = uvloop.run(run(e.url, scenario(e, f"{name}@{rate:g}", rate, args.step_s, i)))
                summary = res.summary()
                summary["rss_mb"] = rss_mb(e.proc.pid) if e.proc is not None else None
                cpu_s = tree_cpu_s(e.proc.pid) - cpu0 if e.proc is not None else None
                summary["cpu_ms_per_request"] = (cpu_s * 1000 / max(1, summary["requests"])
                                                 if cpu_s is not None else None)
                summary["chunks_per_cpu_s"] = (summary["chunks"] / cpu_s if cpu_s and summary["chunks"] else None)
                summary["upstream_cpu_ms_per_request"] = ((tree_cpu_s(upstream_proc.pid) - up0) * 1000
                                                          / max(1, summary["requests"]))
                row["engines"][name] = summary
                time.sleep(1.0)  # let the last answers and closes settle before the next engine
            judge(row)
            results.append(row)
            # An engine leaves after two rates in a row it did not sustain: one bad step on this shared machine
            # (another process's burst) must not end an engine's run.
            saturated |= {name for name in row["engines"] if name != "direct" and len(results) >= 2
                          and not any(r["engines"].get(name, {}).get("sustained", True) for r in results[-2:])}
            print(json.dumps({"rate": rate, **{n: (round(s["achieved_rps"], 1), s["error_rate"],
                                                 s["latency_ms"] and round(s["latency_ms"]["p99"], 1),
                                                 s["cpu_ms_per_request"] and round(s["cpu_ms_per_request"], 2),
                                                 s["overhead_ms"] and round(s["overhead_ms"]["p99"], 1),
                                                 s["sustained"])
                                                for n, s in row["engines"].items()}}), flush=True)
            if all(n in saturated for n in engines if n != "direct"):
                break
    report(out, args, description, results)


def judge(row: dict[str, Any]) -> None:
    """Mark each engine of one rate sustained or not, with its latency added to direct's. Where direct itself
    does not sustain the rate the upstream is the limit: no engine sustains it, however it compares."""
    direct = row["engines"]["direct"]
    upstream_ok = sustains(direct, direct)
    for s in row["engines"].values():
        s["sustained"] = upstream_ok and sustains(s, direct)
        if s["latency_ms"] and direct["latency_ms"]:
            s["added_ms"] = {k: s["latency_ms"][k] - direct["latency_ms"][k] for k in ("p50", "p99")}
        if s.get("chunk_gap_ms") and direct.get("chunk_gap_ms"):
            s["added_gap_ms"] = {k: s["chunk_gap_ms"][k] - direct["chunk_gap_ms"][k] for k in ("p50", "p99")}


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


def check_same_work(engines: dict[str, Engine], extra_body: dict[str, Any], max_tokens: int) -> None:
    """Every engine passes `extra_body` on (`ignore_eos`): each answer has exactly `max_tokens` tokens, so no
    engine is measured on shorter answers than the others."""
    for e in engines.values():
        body = {"model": e.model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}],
                **extra_body}
        resp = httpx.post(f"{e.url}/chat/completions", json=body, timeout=120,
                          headers={"authorization": f"Bearer {e.api_key}", **e.headers})
        resp.raise_for_status()
        got = resp.json()["usage"]["completion_tokens"]
        if got != max_tokens:
            raise SystemExit(f"{e.name} answered {got} tokens, not {max_tokens}: it did not pass {extra_body} on")


def max_sustained(results: list[dict[str, Any]], name: str) -> float:
    """The highest rate an engine sustained (0 when none)."""
    return max((r["rate"] for r in results if r["engines"].get(name, {}).get("sustained")), default=0.0)


def verdicts(results: list[dict[str, Any]], ours: str = "turnout-routed") -> list[str]:
    """The issue's targets, checked on this run: the routed gateway's highest sustained rate against the Portkey
    gateway's and vllm-router's, and a lower added p99 than LiteLLM's and Portkey's at every rate both sustain."""
    if not any(ours in r["engines"] for r in results):
        return []
    mine = max_sustained(results, ours)
    upstream = max_sustained(results, "direct")
    lines = [f"- {ours} sustains {mine:g}/s (direct {upstream:g}/s"
             + ("; the upstream itself sustains no more, so this is a floor)." if mine >= upstream else ").")]
    for theirs in ("litellm", "portkey"):
        if not any(theirs in r["engines"] for r in results):
            continue
        both = [r for r in results
                if r["engines"].get(ours, {}).get("sustained") and r["engines"].get(theirs, {}).get("sustained")]
        lower = [r["rate"] for r in both
                 if r["engines"][ours]["added_ms"]["p99"] < r["engines"][theirs]["added_ms"]["p99"]]
        rates = ", ".join(f"{r['rate']:g}/s" for r in both) or "none"
        lines.append(f"- Lower added p99 than {theirs} at every rate both sustain ({rates}): lower at {len(lower)} "
                     f"of {len(both)}: {'met' if both and len(lower) == len(both) else 'NOT met'}; highest "
                     f"sustained rate {mine:g}/s against {theirs}'s {max_sustained(results, theirs):g}/s.")
    if any("vllm-router" in r["engines"] for r in results):
        lines.append(f"- vllm-router (Rust) sustains {max_sustained(results, 'vllm-router'):g}/s.")
    return lines


def _cell(d: dict[str, float] | None, signed: bool = False) -> str:
    if not d:
        return "-"
    return f"{d['p50']:+.1f} / {d['p99']:+.1f}" if signed else f"{d['p50']:.1f} / {d['p99']:.1f}"


def report(out: Path, args: argparse.Namespace, description: str, results: list[dict[str, Any]]) -> None:
    """Markdown table, JSON and a plot of p99 against the offered rate."""
    names = [n for n in ENGINES if any(n in r["engines"] for r in results)]
    kind = f"every request streamed ({args.max_tokens} tokens)" if args.stream else \
        f"non-streamed chat, max_tokens {args.max_tokens}"
    command = (f"python -m loadtest.sidebyside --upstream {args.upstream}" + (" --stream" if args.stream else "")
               + f" --rates {args.rates} --step-s {args.step_s:g} --max-tokens {args.max_tokens}"
               + (f" --ttft-ms {args.ttft_ms:g} --itl-ms {args.itl_ms:g}" if args.stream else "")
               + f" --engines {','.join(names)}")
    lines = [f"# Side by side: {', '.join(names)}" + (" (streams)" if args.stream else ""), "",
             f"One run, {os.cpu_count()} CPUs shared by the load generator, the engines and the upstream. Open-loop "
             f"Poisson load, {args.step_s:g} s per engine and rate, {kind}, real prompts from the bundled table "
             "(turnout-routed: a new prompt every request). CPU per request: the engine's CPU time (its process "
             "tree) over the step divided by its requests, background work such as health and load polling "
             "included; the generator's own CPU is in the last column. Own overhead: what Turnout reports in "
             "`x-turnout-overhead-ms`. "
             + f"Upstream: {description}. "
             + "Sustained = under 1% errors, p99 within 2x of direct's, 95% of the offered rate completed.", "",
             f"Command: `{command}`.", ""]
    head = ("| rate | engine | achieved req/s | errors | p50 / p99 ms | added p50 / p99 ms ")
    if args.stream:
        head += "| TTFT p50 / p99 ms | chunk gap p50 / p99 ms | added gap p50 / p99 ms | chunks per CPU second "
    else:
        head += "| own overhead p50 / p99 ms "
    head += "| CPU ms per request | RSS MiB | sustained | generator CPU ms per request |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        for name in names:
            s = r["engines"].get(name)
            if s is None:
                continue
            cpu = s.get("cpu_ms_per_request")
            row = (f"| {r['rate']:g} | {name} | {s['achieved_rps']:.1f} | {s['error_rate']:.1%} | "
                   f"{_cell(s['latency_ms'])} | {_cell(s.get('added_ms'), True) if name != 'direct' else '-'} | ")
            if args.stream:
                chunks = s.get("chunks_per_cpu_s")
                row += (f"{_cell(s.get('ttft_ms'))} | {_cell(s.get('chunk_gap_ms'))} | "
                        f"{_cell(s.get('added_gap_ms'), True) if name != 'direct' else '-'} | "
                        + (f"{chunks:,.0f}" if chunks else "-") + " | ")
            else:
                row += f"{_cell(s.get('overhead_ms'))} | "
            row += ((f"{cpu:.2f}" if cpu is not None else "-") + " | "
                    + (f"{s['rss_mb']:.0f}" if s.get("rss_mb") else "-")
                    + f" | {'yes' if s['sustained'] else 'no'} | {s['generator_cpu_ms_per_request']:.2f} |")
            lines.append(row)
    lines += ["", "Highest rate sustained: " + ", ".join(f"{n} {max_sustained(results, n):g}/s" for n in names)
              + ".", "", *verdicts(results)]
    write_results(out, {"upstream": args.upstream, "stream": args.stream, "rates": [r["rate"] for r in results],
                        "step_s": args.step_s, "max_tokens": args.max_tokens, "command": command,
                        "results": results, "max_sustained": {n: max_sustained(results, n) for n in names},
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
