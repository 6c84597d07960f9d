"""Gateway overhead over N non-streaming requests through the fake worker, side by side with direct calls.

Reports the gateway's own `x-turnout-overhead-ms` (time in the gateway excluding the wait on the worker)
and the client-side latency direct to the worker and through the gateway, measured in one run.

    python -m loadtest.overhead --requests 1000 [--concurrency 8] [--out loadtest/results/overhead]
"""

from __future__ import annotations

import argparse
import asyncio
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

from loadtest.engines import fake_process, gateway_process
from loadtest.results_io import write_results
from tests.procs import free_port

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
        client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", http_client=http, max_retries=0)
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


def main() -> None:
    """Run the benchmark and write JSON and markdown results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", default="1,8", help="comma-separated levels, each measured in turn")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "overhead")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="turnout-overhead-"))
    wport, gport = free_port(), free_port()
    cfg = {
        "workers": [{"name": "fake", "model": "fake-model", "base_url": f"http://127.0.0.1:{wport}/v1",
                     "price": {"input_per_1m": 0.1, "output_per_1m": 0.2}}],
        "policies": {"fixed": {"type": "fixed", "worker": "fake"}},
        "default_policy": "fixed",
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    fake = fake_process(wport, "fake-model")
    gateway = gateway_process(tmp / "config.yaml", gport, log_level="warning")
    levels = [int(c) for c in args.concurrency.split(",")]
    runs: list[dict[str, Any]] = []
    with fake, gateway:
        direct_url, gw_url = f"http://127.0.0.1:{wport}/v1", f"http://127.0.0.1:{gport}/v1"
        asyncio.run(run_load(gw_url, args.warmup, max(levels), "auto"))
        asyncio.run(run_load(direct_url, args.warmup, max(levels), "fake-model"))
        for c in levels:
            direct_lat, _ = asyncio.run(run_load(direct_url, args.requests, c, "fake-model"))
            cpu0 = cpu_seconds(gateway.pid)
            gw_lat, overheads = asyncio.run(run_load(gw_url, args.requests, c, "auto"))
            runs.append({
                "concurrency": c,
                "overhead_header_ms": {"median": statistics.median(overheads), "p90": pct(overheads, 90),
                                       "p99": pct(overheads, 99), "max": max(overheads), "n": len(overheads)},
                "client_latency_ms": {
                    "direct": {"median": statistics.median(direct_lat) * 1000, "p99": pct(direct_lat, 99) * 1000},
                    "gateway": {"median": statistics.median(gw_lat) * 1000, "p99": pct(gw_lat, 99) * 1000},
                },
                "gateway_cpu_ms_per_request": (cpu_seconds(gateway.pid) - cpu0) / args.requests * 1000,
            })

    result = {"requests": args.requests, "stream": False,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "runs": runs}
    lines = [
        f"# Gateway overhead: {args.requests} non-streaming requests through the fake worker",
        "",
        f"One run, {os.cpu_count()} CPUs shared by the load client, the gateway and the fake worker; at each",
        "concurrency the same load goes direct to the worker, then through the gateway.",
        "`x-turnout-overhead-ms` is the gateway's time excluding the wait on the worker (which includes the",
        "upstream HTTP client's own work); the client-side difference also counts HTTP parsing and the extra hop.",
        "",
        "Command: `python -m loadtest.overhead --requests 1000` (or `make bench`).",
        "",
        "| concurrency | overhead header median ms | p99 ms | direct median / p99 ms | gateway median / p99 ms "
        "| gateway CPU ms/request |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        o, d, g = r["overhead_header_ms"], r["client_latency_ms"]["direct"], r["client_latency_ms"]["gateway"]
        lines.append(f"| {r['concurrency']} | {o['median']:.3f} | {o['p99']:.3f} | {d['median']:.2f} / {d['p99']:.2f} "
                     f"| {g['median']:.2f} / {g['p99']:.2f} | {r['gateway_cpu_ms_per_request']:.2f} |")
    write_results(args.out, result, "\n".join([*lines, ""]))


if __name__ == "__main__":
    main()
