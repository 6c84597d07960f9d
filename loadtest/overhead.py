"""Gateway overhead over N non-streaming requests through the fake worker, side by side with direct calls:
metrics on and off, per-key limits on the memory store and on Redis, and OpenTelemetry traces on (exported to a
local OTLP receiver process) against off.

Reports the gateway's own `x-turnout-overhead-ms` (time in the gateway excluding the wait on the worker),
the client-side latency direct to the worker and through the five gateways, and each gateway's CPU per
request, measured in one run.

    python -m loadtest.overhead --requests 1000 [--concurrency 8] [--out loadtest/results/overhead]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import openai
import yaml

from loadtest.results_io import write_results
from server.quota.keys import hash_key
from testkit.engines import fake_process, gateway_process, otlp_receiver_process
from testkit.procs import free_port
from testkit.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
MSG: list[Any] = [{"role": "user", "content": "How far is the moon from the earth?"}]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100)."""
    return float(np.percentile(np.asarray(values), q))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_load(base_url: str, n: int, concurrency: int, model: str) -> tuple[list[float], list[float]]:
    """Send n chat requests with `concurrency` in flight; client latencies (s) and overhead headers (ms)."""
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(limits=limits, timeout=60) as http:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=BENCH_KEY, http_client=http, max_retries=0)
        latencies: list[float] = []
        overheads: list[float] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                t = time.perf_counter()
                raw = await client.chat.completions.with_raw_response.create(model=model, messages=MSG,
                                                                             max_tokens=16)
                latencies.append(time.perf_counter() - t)
                if "x-turnout-overhead-ms" in raw.headers:
                    overheads.append(float(raw.headers["x-turnout-overhead-ms"]))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, overheads


BENCH_KEY = "tk-bench"
#: Each arm's config changes. "limits" arms authenticate a key with a per-minute limit and a budget (large
#: enough never to refuse), so every request does the store's work: its admission (window, budget read and
#: hold), its feedback record and its settle.
ARMS: dict[str, dict[str, Any]] = {
    "metrics on": {},
    "metrics off": {"server": {"metrics": False}},
    "limits, memory store": {"auth": "limits", "state": {"backend": "memory"}},
    "limits, redis store": {"auth": "limits", "state": {"backend": "redis"}},
    "tracing on": {"tracing": True},
}


def arm_config(arm: str, worker_port: int) -> dict[str, Any]:
    """The gateway config of one arm."""
    over = ARMS[arm]
    cfg: dict[str, Any] = {
        "workers": [{"name": "fake", "model": "fake-model", "base_url": f"http://127.0.0.1:{worker_port}/v1",
                     "price": {"input_per_1m": 0.1, "output_per_1m": 0.2}}],
        "policies": {"fixed": {"type": "fixed", "worker": "fake"}},
        "default_policy": "fixed",
        "server": over.get("server", {}),
    }
    if "state" in over:
        cfg["state"] = over["state"]
    if over.get("auth") == "limits":
        cfg["auth"] = {"enabled": True, "keys": [{"name": "bench", "key_sha256": hash_key(BENCH_KEY),
                                                  "requests_per_minute": 10_000_000, "budget_usd": 1e6}]}
    return cfg


def dist(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """Median, p90, p99 and max of `values` times `scale`."""
    return {"median": statistics.median(values) * scale, "p90": pct(values, 90) * scale,
            "p99": pct(values, 99) * scale, "max": max(values) * scale, "n": len(values)}


def main() -> None:
    """Run the benchmark and write JSON and markdown results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="per arm and concurrency level")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated levels, each measured in turn")
    ap.add_argument("--rounds", type=int, default=5, help="the arms take turns in this many rounds per level")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "overhead")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="turnout-overhead-"))
    wport = free_port()
    ports = {arm: free_port() for arm in ARMS}
    redis_server = RedisServer(tmp / "redis.log")
    receiver_port = free_port()
    gateways = {}
    for arm in ARMS:
        path = tmp / f"{arm.replace(' ', '-').replace(',', '')}.yaml"
        path.write_text(yaml.safe_dump(arm_config(arm, wport)))
        gateways[arm] = gateway_process(path, ports[arm], log_level="warning")
        gateways[arm].env = {**(gateways[arm].env or {}), "TURNOUT_REDIS_URL": redis_server.url}
        if ARMS[arm].get("tracing"):  # every request sampled (the SDK's default), exported in batches
            gateways[arm].env = {**(gateways[arm].env or {}),
                                 "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}"}
    fake = fake_process(wport, "fake-model")
    levels = [int(c) for c in args.concurrency.split(",")]
    per_round = args.requests // args.rounds
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(redis_server)
        stack.enter_context(otlp_receiver_process(receiver_port, tmp / "otlp.log"))
        stack.enter_context(fake)
        for proc in gateways.values():
            stack.enter_context(proc)
        direct_url = f"http://127.0.0.1:{wport}/v1"
        urls = {arm: f"http://127.0.0.1:{ports[arm]}/v1" for arm in ARMS}
        for arm in ARMS:
            asyncio.run(run_load(urls[arm], args.warmup, max(levels), "auto"))
        asyncio.run(run_load(direct_url, args.warmup, max(levels), "fake-model"))
        for c in levels:
            direct_lat, _ = asyncio.run(run_load(direct_url, args.requests, c, "fake-model"))
            lat: dict[str, list[float]] = {arm: [] for arm in ARMS}
            over: dict[str, list[float]] = {arm: [] for arm in ARMS}
            cpu = dict.fromkeys(ARMS, 0.0)
            for rnd in range(args.rounds):
                # Rotate which arm goes first, so drift on the shared machine falls on every arm alike.
                names = list(ARMS)
                for arm in names[rnd % len(names):] + names[:rnd % len(names)]:
                    cpu0 = cpu_seconds(gateways[arm].pid)
                    got_lat, got_over = asyncio.run(run_load(urls[arm], per_round, c, "auto"))
                    cpu[arm] += cpu_seconds(gateways[arm].pid) - cpu0
                    lat[arm] += got_lat
                    over[arm] += got_over
            n = per_round * args.rounds
            runs.append({
                "concurrency": c,
                "direct_latency_ms": dist(direct_lat, 1000),
                "arms": {arm: {"overhead_header_ms": dist(over[arm]), "client_latency_ms": dist(lat[arm], 1000),
                               "gateway_cpu_ms_per_request": cpu[arm] / n * 1000} for arm in ARMS},
            })

    result = {"requests_per_arm": args.requests, "rounds": args.rounds, "stream": False,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "runs": runs}
    lines = [
        f"# Gateway overhead: {args.requests} non-streaming requests per arm through the fake worker",
        "",
        f"One run, {os.cpu_count()} CPUs shared by the load client, five gateways, Redis, an OTLP receiver and the "
        "fake worker. At",
        "each concurrency the load goes direct to the worker, then through five gateways taking turns in "
        f"{args.rounds} rounds",
        "(the order rotated each round): metrics on (the default), `server.metrics: false`, a client key with a",
        "per-minute limit and a budget checked on the memory store and on Redis (`state.backend: redis`, a local",
        "`redis-server`), and traces on (`OTEL_EXPORTER_OTLP_ENDPOINT` set: every request sampled, its spans sent",
        "in batches to a local OTLP/HTTP receiver process). All use the `fixed` policy and log at warning (no",
        "request log line).",
        "`x-turnout-overhead-ms` is the gateway's time excluding the wait on the worker (which includes the",
        "upstream HTTP client's own work); the client-side difference also counts HTTP parsing and the extra hop.",
        "",
        "Command: `python -m loadtest.overhead --requests 1000` (or `make bench`).",
        "",
        "| concurrency | arm | overhead header median / p90 / p99 ms | client median / p99 ms "
        "| gateway CPU ms/request |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        d = r["direct_latency_ms"]
        lines.append(f"| {r['concurrency']} | direct to the worker | - | {d['median']:.2f} / {d['p99']:.2f} | - |")
        for arm, a in r["arms"].items():
            o, g = a["overhead_header_ms"], a["client_latency_ms"]
            lines.append(f"| {r['concurrency']} | gateway, {arm} | {o['median']:.3f} / {o['p90']:.3f} / "
                         f"{o['p99']:.3f} | {g['median']:.2f} / {g['p99']:.2f} "
                         f"| {a['gateway_cpu_ms_per_request']:.2f} |")
    for title, a, b in (("Metrics on against off", "metrics on", "metrics off"),
                        ("Limits on the Redis store against the memory store", "limits, redis store",
                         "limits, memory store"),
                        ("Limits (memory store) against none", "limits, memory store", "metrics on"),
                        ("Tracing on against off", "tracing on", "metrics on")):
        lines += ["", f"## {title} (same run)", ""]
        for r in runs:
            x, y = r["arms"][a], r["arms"][b]
            lines.append(
                f"- concurrency {r['concurrency']}: overhead median "
                f"{x['overhead_header_ms']['median'] / y['overhead_header_ms']['median']:.2f}x "
                f"({x['overhead_header_ms']['median'] - y['overhead_header_ms']['median']:+.3f} ms), p99 "
                f"{x['overhead_header_ms']['p99'] / y['overhead_header_ms']['p99']:.2f}x "
                f"({x['overhead_header_ms']['p99'] - y['overhead_header_ms']['p99']:+.3f} ms); gateway CPU "
                f"{x['gateway_cpu_ms_per_request'] - y['gateway_cpu_ms_per_request']:+.2f} ms/request.")
    write_results(args.out, result, "\n".join([*lines, ""]))


if __name__ == "__main__":
    main()
