"""Where the gateway's CPU goes: a sampling profile (py-spy) of the gateway at a steady rate, per policy.

For each policy (`fixed`, and `knn` with the default (static) embedder, or `--embedder onnx`, on a new prompt every
request), a gateway process is started in front of nine workers (one light fake, `loadtest.fast_upstream`, answering
after `--worker-latency-ms`) and warmed up; then chat requests
arrive at `--rate` per second, evenly spaced, for `--seconds`, while `py-spy record --pid --nonblocking` samples
the gateway (from outside: it is never paused; start-up and warm-up are not in the profile). The samples are
summed per function (self: the function was running; inclusive: it was on the stack) and per area of the code
(the HTTP server, the upstream client, validation, the gateway's own modules, the embedder...), and the gateway's
CPU per request is read from /proc over the same window.

    python -m loadtest.profile_gateway [--rate 100] [--seconds 30] [--out loadtest/results/profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2

from loadtest.overhead import cpu_seconds
from loadtest.results_io import write_results
from loadtest.routing_overhead import ensure_artifacts, start, write_config
from routers.offline.dataset import load_table
from testkit.engines import BUNDLED_TABLE, PY_ENV, REPO, gateway_process, table_prices
from testkit.procs import ManagedProcess, free_port

#: Areas of the code, by the first pattern a frame's file matches (checked in order).
AREAS = (
    ("embedding (onnxruntime, tokenizers)", r"onnxruntime|tokenizers|routers/embedding"),
    ("routing policies (routers/)", r"/routers/"),
    ("numpy, scikit-learn", r"/numpy/|/sklearn/|/scipy/|threadpoolctl"),
    ("upstream client (aiohttp, multidict, yarl)", r"/aiohttp/|/multidict/|/yarl/|/aiohappyeyeballs/|/propcache/"),
    ("HTTP server (uvicorn, httptools)", r"/uvicorn/|httptools|server/connections\.py"),
    ("framework (starlette, fastapi)", r"/starlette/|/fastapi/"),
    ("validation (pydantic)", r"/pydantic"),
    ("metrics (prometheus_client)", r"prometheus_client"),
    ("JSON (orjson, json)", r"orjson|/json/"),
    ("logging", r"/logging/"),
    ("the gateway (server/)", r"/server/"),
    ("asyncio", r"/asyncio/|uvloop"),
)
#: The frames between the process's entry and the event loop: on every stack, so not shown as inclusive time.
ENTRY_FRAMES = (r"runpy|server/__main__\.py|server/cli\.py|/typer/|/click/|uvicorn/main\.py|uvicorn/server\.py|"
                r"uvicorn/_compat\.py|asyncio/runners\.py|asyncio/base_events\.py|asyncio/events\.py")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def area_of(file: str) -> str:
    """The area a source file belongs to ("other" when none matches)."""
    for name, pattern in AREAS:
        if re.search(pattern, file):
            return name
    return "other"


def summarise(raw: Path, top: int) -> dict[str, Any]:
    """Self and inclusive samples per function, and self samples per area, from py-spy's collapsed stacks."""
    self_s: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = stack.split(";")
        names = []
        for frame in frames:
            m = FRAME.match(frame)
            func, file = (m.group("func"), m.group("file")) if m else (frame, "")
            names.append((f"{func} ({_short(file)})", file))
        leaf_name, leaf_file = names[-1]
        self_s[leaf_name] += count
        areas[area_of(leaf_file)] += count
        for name, file in dict.fromkeys(names):  # a recursive function counts once per sample
            if not re.search(ENTRY_FRAMES, file):
                incl[name] += count

    def share(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [{"name": k, "samples": v, "share": v / total} for k, v in counter.most_common(top)]

    return {"samples": total, "self": share(self_s), "inclusive": share(incl),
            "areas": [{"name": k, "samples": v, "share": v / total} for k, v in areas.most_common()]}


def _short(file: str) -> str:
    """A frame's file from its package on (site-packages and the repo's root cut off)."""
    for cut in ("site-packages/", f"{REPO}/"):
        if cut in file:
            return file.split(cut, 1)[1]
    return re.sub(r"^.*/lib/python3\.\d+/", "", file)  # the standard library's own modules


async def drive(url: str, texts: list[str], rate: float, seconds: float) -> tuple[int, int, float]:
    """Evenly spaced chat requests for `seconds`; (answered 200, failed, wall seconds)."""
    ok = failed = 0
    limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx2.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal ok, failed
            try:
                r = await client.post("/v1/chat/completions", json={
                    "model": "auto", "max_tokens": 16, "messages": [{"role": "user", "content": texts[i]}]})
                ok, failed = (ok + 1, failed) if r.status_code == 200 else (ok, failed + 1)
            except httpx2.HTTPError:
                failed += 1

        n = int(rate * seconds)
        started = time.perf_counter()
        tasks = []
        for i in range(n):
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        return ok, failed, time.perf_counter() - started


def profile_policy(policy: str, args: argparse.Namespace, tmp: Path, texts: list[str]) -> dict[str, Any]:
    """One gateway under py-spy with `policy` as its default; the profile's summary and the CPU per request."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        raise SystemExit("py-spy is not installed: `make test` installs it (the dev extra)")
    cfg = tmp / f"{policy}.yaml"
    cfg.write_text((tmp / "base.yaml").read_text().replace("default_policy: fixed", f"default_policy: {policy}"))
    raw = tmp / f"{policy}.raw.txt"
    port = free_port()
    proc = gateway_process(cfg, port, tmp / f"gateway-{policy}.log", "warning")
    proc.timeout_s = 120
    with proc:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(drive(url, texts[:50], 20, 2))  # warm-up: the model's first runs, connections
        # Attached for the load's window only (start-up and warm-up are not in the profile); never pausing it.
        sampler = subprocess.Popen([spy, "record", "--pid", str(proc.pid), "--nonblocking", "--rate",
                                    str(args.sample_rate), "--duration", str(math.ceil(args.seconds)),
                                    "--full-filenames", "--format", "raw", "--output", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = cpu_seconds(proc.pid)
        rate = args.rate if policy == "fixed" else args.routed_rate
        ok, failed, wall = asyncio.run(drive(url, texts[50:], rate, args.seconds))
        cpu = cpu_seconds(proc.pid) - before
        _, err = sampler.communicate(timeout=120)
    if sampler.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({sampler.returncode}): {err.decode(errors='replace')[-500:]}")
    summary = summarise(raw, args.top)
    return {"policy": policy, "rate": rate, "answered": ok, "failed": failed, "wall_s": wall,
            "cpu_ms_per_request": cpu / max(ok + failed, 1) * 1000, **summary}


def markdown(results: list[dict[str, Any]], command: str, args: argparse.Namespace) -> str:
    """Per policy: CPU per request, the areas, and the top functions by self and inclusive samples."""
    out = ["# Where the gateway's CPU goes", "",
           f"`{command}`: chat requests evenly spaced for {args.seconds:g} s through a gateway "
           f"process sampled by py-spy ({args.sample_rate} samples/s, never pausing it), nine workers on one light "
           f"fake answering after {args.worker_latency_ms:g} ms. `knn` ({args.embedder} embedder) gets a prompt it "
           "has not seen on "
           "every request. Shares are of the samples in which the gateway's Python code was running (self) or "
           "on the stack (inclusive), over all its threads. Time in C is the calling Python frame's: `Runner.run`'s "
           "self time is the event loop's own (uvloop), `StreamWriter._writelines`'s (aiohttp) and "
           "`RequestResponseCycle.send`'s (uvicorn) the socket writes.", ""]
    for r in results:
        out += [f"## `{r['policy']}` at {r['rate']:g} requests/s", "",
                f"{r['answered']} answered, {r['failed']} failed in {r['wall_s']:.1f} s; gateway CPU "
                f"**{r['cpu_ms_per_request']:.2f} ms per request**; {r['samples']} samples.", "",
                "| area (self) | share |", "|---|---:|"]
        out += [f"| {a['name']} | {a['share']:.1%} |" for a in r["areas"]]
        out += ["", "| function (self) | share |", "|---|---:|"]
        out += [f"| `{f['name']}` | {f['share']:.1%} |" for f in r["self"][:20]]
        out += ["", "| function (inclusive) | share |", "|---|---:|"]
        out += [f"| `{f['name']}` | {f['share']:.1%} |" for f in r["inclusive"][:25]]
        out.append("")
    return "\n".join(out)


def main() -> None:
    """Profile each policy and write the summary as JSON and markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second for `fixed`")
    ap.add_argument("--routed-rate", type=float, default=100.0,
                    help="requests per second for `knn` (new prompts; with --embedder onnx 2 cores keep up with "
                         "about 30)")
    ap.add_argument("--embedder", choices=["static", "onnx"], default="static", help="the knn policy's embedder")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--sample-rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--worker-latency-ms", type=float, default=50.0)
    ap.add_argument("--policies", nargs="+", default=["fixed", "knn"], choices=["fixed", "knn"])
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--data", type=Path, default=BUNDLED_TABLE)
    ap.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "profile")
    args = ap.parse_args()
    command = " ".join(["python -m loadtest.profile_gateway", *sys.argv[1:]])
    data = load_table(args.data)
    artifacts = ensure_artifacts(args.data, data, False, args.embedder)
    models = sorted(data.models)
    texts = list(dict.fromkeys(data.prompts))
    needed = int(max(args.rate, args.routed_rate) * args.seconds) + 50
    if len(texts) < needed:
        raise SystemExit(f"{len(texts)} distinct prompts, {needed} needed: lower --rate or --seconds")
    tmp = Path(tempfile.mkdtemp(prefix="turnout-profile-"))
    port = free_port()
    ports = {m: port for m in models}  # the light fake answers every model
    write_config(tmp / "base.yaml", ports, artifacts, models, table_prices(args.data, models), ("fixed", "knn"),
                 {"backend": args.embedder})
    results = []
    with contextlib.ExitStack() as stack:
        start(stack, ManagedProcess([sys.executable, "-m", "loadtest.fast_upstream", "--port", str(port),
                                     "--latency-ms", str(args.worker_latency_ms)],
                                    ready_url=f"http://127.0.0.1:{port}/health", env=PY_ENV, cwd=REPO,
                                    log_path=tmp / "fake.log", timeout_s=30), "the fake workers")
        for policy in args.policies:
            results.append(profile_policy(policy, args, tmp, texts))
            print(f"{policy}: {results[-1]['cpu_ms_per_request']:.2f} ms CPU per request", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, {"rate": args.rate, "seconds": args.seconds, "results": results},
                  markdown(results, command, args))
    print(json.dumps({r["policy"]: round(r["cpu_ms_per_request"], 2) for r in results}))


if __name__ == "__main__":
    main()
