"""Open-loop load: requests arrive at a fixed rate (Poisson arrivals) whatever is in flight, as real traffic
does, so a slow server builds a queue instead of slowing the generator down. Streaming and not, mixed as a
scenario file says (`loadtest/scenarios/*.yaml`).

Reports p50/p90/p99 latency, time to first token and the gaps between a stream's chunks (streams), the
gateway's own `x-turnout-overhead-ms` when the server sends it, errors by kind, the rate achieved, how late
requests left against their planned times (a generator that falls behind is measuring itself, not the
server) and the generator's own CPU per request.

The client is a plain `aiohttp` connection pool speaking the OpenAI wire format, not the `openai` SDK: the SDK
(and httpx under it) costs a millisecond or more of CPU per request, which at hundreds of requests per second
on a small machine would make the generator the bottleneck.

    python -m loadtest.openloop --scenario loadtest/scenarios/chat-mixed.yaml --url http://127.0.0.1:8080/v1 \\
        [--rate 50] [--duration 30] [--out loadtest/results/openloop]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import uvloop
import yaml
from pydantic import BaseModel, ConfigDict, Field

REPO = Path(__file__).resolve().parents[1]


class Scenario(BaseModel):
    """A load scenario (a YAML file under `loadtest/scenarios/`)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    model: str = "auto"  # the `model` field sent
    rate: float = Field(default=50.0, gt=0)  # requests per second (Poisson arrivals)
    duration_s: float = Field(default=30.0, gt=0)
    stream_share: float = Field(default=0.0, ge=0, le=1)  # share of requests streamed
    max_tokens: int = Field(default=16, ge=1)
    prompts: list[str] = Field(default_factory=lambda: ["How far is the moon from the earth?"], min_length=1)
    extra_body: dict[str, Any] = Field(default_factory=dict)  # merged into every request body
    timeout_s: float = Field(default=60.0, gt=0)
    api_key: str = "x"
    headers: dict[str, str] = Field(default_factory=dict)  # sent with every request (a peer's routing headers)
    # Make every prompt new (a request number appended), so that no cache of prompts or embeddings is hit.
    unique_prompts: bool = False
    seed: int = 1


def load_scenario(path: Path, **overrides: Any) -> Scenario:
    """A scenario from its file, with command-line overrides (None values ignored)."""
    raw = yaml.safe_load(path.read_text())
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return Scenario.model_validate(raw)


@dataclass(slots=True)
class Sample:
    """One request's outcome."""

    planned: float  # seconds after the start it was due to leave
    lag_s: float  # how late it left
    latency_s: float | None = None
    ttft_s: float | None = None
    overhead_ms: float | None = None
    status: int | None = None
    error: str | None = None  # None: a complete success
    stream: bool = False
    gaps: array.array[float] | None = None  # a stream's times between two content chunks, seconds


@dataclass
class Result:
    """What one open-loop run measured."""

    scenario: Scenario
    url: str
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    cpu_s: float = 0.0  # the generator's own CPU time over the run

    def summary(self) -> dict[str, Any]:
        """Percentiles, rates and errors (milliseconds for times)."""
        ok = [s for s in self.samples if s.error is None]
        errors = collections.Counter(s.error for s in self.samples if s.error is not None)
        n = len(self.samples)

        def pct(values: list[float]) -> dict[str, float] | None:
            if not values:
                return None
            arr = np.asarray(values) * 1000
            return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
                    "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}

        overheads = [s.overhead_ms / 1000 for s in ok if s.overhead_ms is not None]
        return {
            "requests": n, "ok": len(ok), "error_rate": (n - len(ok)) / n if n else 0.0,
            # Offered: the requests planned over the run (a Poisson draw around the scenario's rate); achieved: the
            # successes over the time in which answers came back, from the fastest answer's length after the start
            # to the last answer (longer than planned when the server fell behind). Counting from the start would
            # charge every engine for the length of one answer: a 4 s stream in a 10 s run would cap it at 71%.
            "errors": dict(errors), "offered_rps": n / self.scenario.duration_s,
            "achieved_rps": len(ok) / window if (window := self.seconds - min(
                (s.latency_s for s in ok if s.latency_s is not None), default=0.0)) > 0 else 0.0,
            "latency_ms": pct([s.latency_s for s in ok if s.latency_s is not None]),
            "ttft_ms": pct([s.ttft_s for s in ok if s.ttft_s is not None]),
            "overhead_ms": pct(overheads),
            "send_lag_ms": pct([s.lag_s for s in self.samples]),
            "chunk_gap_ms": pct([g for s in ok if s.gaps is not None for g in s.gaps]),
            "chunks": sum(len(s.gaps) + 1 for s in ok if s.gaps),
            "generator_cpu_ms_per_request": self.cpu_s * 1000 / n if n else 0.0,
        }


def arrivals(rate: float, duration_s: float, rng: random.Random) -> list[float]:
    """Poisson arrival times in [0, duration_s)."""
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def one(http: aiohttp.ClientSession, url: str, sc: Scenario, body: dict[str, Any], sample: Sample) -> None:
    """Send one request and fill in its sample."""
    t0 = time.perf_counter()
    headers = {"authorization": f"Bearer {sc.api_key}", "content-type": "application/json", **sc.headers}
    try:
        async with http.post(f"{url}/chat/completions", data=orjson.dumps(body), headers=headers) as resp:
            sample.status = resp.status
            if sample.stream:
                await _read_stream(resp, sample, t0)
            else:
                await resp.read()
            if resp.status != 200:
                sample.error = f"http_{resp.status}"
            if resp.status == 200 and "x-turnout-overhead-ms" in resp.headers:
                sample.overhead_ms = float(resp.headers["x-turnout-overhead-ms"])
    except TimeoutError:
        sample.error = "timeout"
    except aiohttp.ClientError as exc:
        sample.error = type(exc).__name__
    sample.latency_s = time.perf_counter() - t0


async def _read_stream(resp: aiohttp.ClientResponse, sample: Sample, t0: float) -> None:
    """Read an SSE answer: time to the first content, the gaps between content events, errors, `[DONE]`."""
    done = False
    last: float | None = None
    gaps: array.array[float] = array.array("d")
    async for raw in resp.content:  # line by line
        if not raw.startswith(b"data: "):
            continue
        data = raw[6:].rstrip()
        if data == b"[DONE]":
            done = True
        elif b'"content"' in data:
            now = time.perf_counter()
            if last is None:
                sample.ttft_s = now - t0
            else:
                gaps.append(now - last)
            last = now
        elif b'"error"' in data:
            sample.error = "stream_error"
    sample.gaps = gaps
    if resp.status == 200 and not done and sample.error is None:
        sample.error = "truncated"


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(url: str, sc: Scenario) -> Result:
    """Drive `sc` against the OpenAI-compatible API at `url` (ending in /v1)."""
    rng = random.Random(sc.seed)
    plan = arrivals(sc.rate, sc.duration_s, rng)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
    timeout = aiohttp.ClientTimeout(total=sc.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as http:
        result = Result(sc, url, 0.0)
        tasks: list[asyncio.Task[None]] = []
        cpu0, start = _cpu_s(), time.perf_counter()
        for i, t in enumerate(plan):
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            stream = rng.random() < sc.stream_share
            prompt = sc.prompts[i % len(sc.prompts)]
            if sc.unique_prompts:
                prompt = f"{prompt}\n\n(request {sc.seed}.{i})"
            body: dict[str, Any] = {"model": sc.model, "max_tokens": sc.max_tokens, "stream": stream,
                                    "messages": [{"role": "user", "content": prompt}], **sc.extra_body}
            sample = Sample(planned=t, lag_s=max(0.0, time.perf_counter() - start - t), stream=stream)
            result.samples.append(sample)
            tasks.append(asyncio.create_task(one(http, url, sc, body, sample)))
        await asyncio.gather(*tasks)
        # From the start until the last answer came back.
        result.seconds = max(sc.duration_s, time.perf_counter() - start)
        result.cpu_s = _cpu_s() - cpu0
    await asyncio.sleep(0)  # let the closed connections' sockets close before the loop ends
    return result


def markdown(results: list[Result]) -> str:
    """A table of the runs."""
    lines = ["| url | offered req/s | achieved req/s | errors | latency p50 / p90 / p99 ms | TTFT p50 / p99 ms "
             "| overhead p50 / p99 ms | send lag p99 ms |", "|---|---|---|---|---|---|---|---|"]

    def f(d: dict[str, float] | None, *keys: str) -> str:
        return " / ".join(f"{d[k]:.1f}" for k in keys) if d else "-"

    for r in results:
        s = r.summary()
        lines.append(f"| {r.url} | {s['offered_rps']:.1f} | {s['achieved_rps']:.1f} | {s['error_rate']:.2%} "
                     f"| {f(s['latency_ms'], 'p50', 'p90', 'p99')} | {f(s['ttft_ms'], 'p50', 'p99')} "
                     f"| {f(s['overhead_ms'], 'p50', 'p99')} | {f(s['send_lag_ms'], 'p99')} |")
    return "\n".join(lines)


def main() -> None:
    """Run one scenario against one URL and print (or write) the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", type=Path, default=REPO / "loadtest" / "scenarios" / "chat-mixed.yaml")
    ap.add_argument("--url", required=True, help="OpenAI-compatible base URL, ending in /v1")
    ap.add_argument("--rate", type=float)
    ap.add_argument("--duration", type=float, dest="duration_s")
    ap.add_argument("--model")
    ap.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = ap.parse_args()
    sc = load_scenario(args.scenario, rate=args.rate, duration_s=args.duration_s, model=args.model)
    result = uvloop.run(run(args.url.rstrip("/"), sc))
    text = f"# Open-loop load: scenario `{sc.name}`\n\n" + markdown([result])
    if args.out is not None:
        from loadtest.results_io import write_results

        write_results(args.out, {"scenario": sc.model_dump(), "url": args.url, "summary": result.summary()}, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
