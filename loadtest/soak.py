"""Soak under chaos: N requests at a steady rate through one gateway process in front of three fake workers
that keep failing (500s, hangs, streams cut mid-way, slow answers, and crashes with restarts), from the
`openai` SDK.

Checks that every request ends in a success or a well-formed OpenAI error, that the client's counts by
status equal the gateway's `turnout_requests_total` exactly, and measures the gateway's memory (RSS) from the
first minute to the last.

With `--routed`, the gateway routes with the `cost_aware` policy (kNN artifact trained on the bundled table)
and the default (static) embedder, or `--embedder onnx`, over the table's nine models (each served by two of
the three fake workers), and the requests carry the table's real prompts, so every request is embedded and
scored: the gateway's memory as a production deployment runs it.

    python -m loadtest.soak [--requests 10000] [--rate 80] [--routed [--embedder onnx]] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtest.results_io import write_results
from testkit.engines import fake_process, gateway_process
from testkit.procs import ManagedProcess, free_port

REPO = Path(__file__).resolve().parents[1]
MSG: list[Any] = [{"role": "user", "content": "Tell me something about the sea."}]
#: Worker-wide faults the chaos task sets (with their weights); {} is healthy.
FAULTS: list[tuple[dict[str, Any], int]] = [
    ({}, 6), ({"status": 500}, 2), ({"hang": True}, 1), ({"drop_after": 2}, 2), ({"latency_ms": 300}, 1),
]


@dataclass
class SoakResult:
    """What a soak saw."""

    requests: int
    seconds: float
    client: dict[str, int]  # outcomes by the gateway's status label, as the client saw them
    gateway: dict[str, int]  # turnout_requests_total by status
    malformed: list[str]  # responses that were neither a success nor a well-formed error
    rss_mb: list[tuple[float, float]]  # (seconds since start, RSS MiB) samples of the gateway
    faults: dict[str, int] = field(default_factory=dict)  # chaos actions taken
    in_flight_after: float = 0.0

    def rss_minutes(self) -> tuple[float, float]:
        """Median RSS (MiB) over the first and the last minute of the run."""
        first = [m for t, m in self.rss_mb if t <= 60]
        last = [m for t, m in self.rss_mb if t >= self.seconds - 60]
        return statistics.median(first), statistics.median(last)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def well_formed_error(body: Any) -> str | None:
    """The error's code when `body` is OpenAI's error object (`{"message", "type", "param", "code"}`)."""
    if isinstance(body, dict) and isinstance(body.get("message"), str) and "type" in body and "code" in body:
        return str(body["code"])
    return None


def label_of(status: int, code: str) -> str:
    """The gateway's status label for an error answer (see `GatewayError.status_label`): the chaos injects no
    worker 4xx, so every 4xx is the gateway's own."""
    return "client_error" if status < 500 else code


@dataclass
class Routed:
    """Learned routing for a soak: a `cost_aware` artifact, its models and their prices, real prompts."""

    artifact: str
    models: list[str]
    prices: dict[str, float]  # USD per 1M tokens
    prompts: list[str]
    embedder: str = "static"

    @classmethod
    def from_bundled_table(cls, seed: int, embedder: str = "static") -> Routed:
        """The bundled table's artifact (trained on first use, as `loadtest.routing_overhead` does) and its
        unique prompts in a seeded order."""
        from loadtest.routing_overhead import ensure_artifacts
        from routers.offline.dataset import load_table
        from testkit.engines import BUNDLED_TABLE, table_prices

        data = load_table(BUNDLED_TABLE)
        artifact = ensure_artifacts(BUNDLED_TABLE, data, False, embedder)["cost_aware"]["path"]
        models = sorted(data.models)
        prompts = list(dict.fromkeys(data.prompts))
        random.Random(seed).shuffle(prompts)
        return cls(artifact, models, table_prices(BUNDLED_TABLE, models), prompts, embedder)


class Soak:
    """The processes and the two loops (load and chaos) of one soak run."""

    def __init__(self, tmp: Path, rate: float, seed: int, routed: Routed | None = None, panic: bool = True) -> None:
        self.tmp, self.rate, self.routed, self.panic = tmp, rate, routed, panic
        self.rng = random.Random(seed)
        self.ports = {"small-a": free_port(), "small-b": free_port(), "big": free_port()}
        # Routed: each fake worker answers as any model ('*'); the gateway's config says which serves what.
        self.models = ({name: "*" for name in self.ports} if routed else
                       {"small-a": "fake-small", "small-b": "fake-small", "big": "fake-big"})
        self.workers: dict[str, ManagedProcess] = {}
        self.gw_port = free_port()
        self.counts: collections.Counter[str] = collections.Counter()
        self.malformed: list[str] = []
        self.faults: collections.Counter[str] = collections.Counter()
        self.done = asyncio.Event()

    def config(self) -> dict[str, Any]:
        """Short timeouts (a hang costs a second, not ten minutes) and quick breakers and health checks."""
        return {
            **(self.routed_workers() if self.routed else self.pair_workers()),
            "upstream": {"ttft_timeout_s": 1.0, "idle_timeout_s": 1.0, "total_timeout_s": 2.0},
            "reliability": {"breaker_failures": 5, "breaker_open_s": 2.0, "queue_timeout_s": 1.0, "panic": self.panic},
            "server": {"health_interval_s": 1.0, "health_timeout_s": 0.5},
        }

    def pair_workers(self) -> dict[str, Any]:
        """Two models: `fake-small` on two workers, `fake-big` on one, chosen 3:1 by weight."""
        return {
            "workers": [{"name": name, "model": self.models[name], "base_url": f"http://127.0.0.1:{port}/v1",
                         "price": {"input_per_1m": 0.1 if name != "big" else 1.0,
                                   "output_per_1m": 0.2 if name != "big" else 3.0},
                         "health_url": f"http://127.0.0.1:{port}/health", "max_concurrency": 64}
                        for name, port in self.ports.items()],
            "policies": {"pair": {"type": "weighted", "weights": {"fake-small": 3, "fake-big": 1}, "seed": 1}},
            "default_policy": "pair",
        }

    def routed_workers(self) -> dict[str, Any]:
        """The artifact's models, each on two of the three fake workers, routed by `cost_aware` with the soak's
        embedder (the gateway's default embedder settings otherwise)."""
        assert self.routed is not None
        names = list(self.ports)
        workers = [{"name": f"m{i}-{host}", "model": model, "base_url": f"http://127.0.0.1:{self.ports[host]}/v1",
                    "price": {"input_per_1m": self.routed.prices[model], "output_per_1m": self.routed.prices[model]},
                    "health_url": f"http://127.0.0.1:{self.ports[host]}/health", "max_concurrency": 64}
                   for i, model in enumerate(self.routed.models) for host in (names[i % 3], names[(i + 1) % 3])]
        return {"workers": workers, "embedder": {"backend": self.routed.embedder},
                "policies": {"routed": {"type": "cost_aware", "artifact": self.routed.artifact, "lambda": 0.5}},
                "default_policy": "routed"}

    def start_worker(self, name: str) -> ManagedProcess:
        proc = fake_process(self.ports[name], self.models[name], self.tmp / f"{name}.log")
        proc.start()
        self.workers[name] = proc
        return proc

    async def one(self, client: openai.AsyncOpenAI, i: int) -> None:
        """One request of a random kind; its outcome counted by the gateway's status label."""
        kind = self.rng.random()
        stream = 0.6 <= kind < 0.85
        messages, named = MSG, "fake-small"
        if self.routed:
            messages = [{"role": "user", "content": self.routed.prompts[i % len(self.routed.prompts)]}]
            named = self.routed.models[i % len(self.routed.models)]
        kwargs: dict[str, Any] = {"model": "auto" if kind < 0.9 else named, "messages": messages,
                                  "max_tokens": self.rng.randint(2, 12)}
        if kind >= 0.95:
            kwargs["max_tokens"] = -1  # a bad request: 400 from the gateway
        if stream:
            kwargs["extra_body"] = {"fake": {"itl_ms": 5}}
        try:
            if stream:
                got = await client.chat.completions.create(stream=True, **kwargs)
                async for _ in got:
                    pass
            else:
                await client.chat.completions.create(**kwargs)
            self.counts["ok"] += 1
        except openai.APIStatusError as exc:
            body = exc.body.get("error") if isinstance(exc.body, dict) and "error" in exc.body else exc.body
            code = well_formed_error(body)
            if code is None:
                self.malformed.append(f"{exc.status_code}: {str(exc.body)[:200]}")
                self.counts["malformed"] += 1
            else:
                self.counts[label_of(exc.status_code, code)] += 1
        except openai.APIConnectionError as exc:  # no answer at all (timed out, connection lost): never expected
            self.malformed.append(f"{type(exc).__name__}: {exc}")
            self.counts["no_answer"] += 1
        except openai.APIError as exc:  # an error event in a stream that had started
            if well_formed_error(exc.body) is None:
                self.malformed.append(f"stream: {str(exc.body)[:200]}")
                self.counts["malformed"] += 1
            else:
                self.counts["stream_error"] += 1

    async def load(self, url: str, n: int) -> None:
        # Idle connections are dropped well before the gateway's keep-alive ends: a request must never go out on a
        # connection the server is closing at that moment (a client-side race, not the gateway's failure).
        limits = httpx2.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=2.0)
        async with httpx2.AsyncClient(limits=limits, timeout=30) as http:
            client = openai.AsyncOpenAI(base_url=url, api_key="x", http_client=http, max_retries=0)
            tasks: set[asyncio.Task[None]] = set()
            # At most this many requests open at once: a client that falls behind the rate must not flood
            # its own connection pool with thousands of waiting requests.
            room = asyncio.Semaphore(64)
            start = time.monotonic()
            for i in range(n):
                # A steady rate: request i leaves at i / rate, or as soon as there is room after that.
                delay = start + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await room.acquire()
                task = asyncio.create_task(self.one(client, i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: room.release())
            await asyncio.gather(*tasks)
        self.done.set()

    async def chaos(self) -> None:
        """Every second or so a worker gets a new fault (or is healed); every ~15 s one crashes and comes back
        3 s later."""
        loop = asyncio.get_running_loop()
        next_crash = loop.time() + 15
        async with httpx.AsyncClient(timeout=2) as http:
            while not self.done.is_set():
                name = self.rng.choice(list(self.ports))
                if loop.time() >= next_crash:
                    next_crash = loop.time() + 15
                    crashed = self.workers[name]
                    await asyncio.to_thread(crashed.kill)
                    crashed.close()  # its log file; a new process takes its port below
                    self.faults["crash"] += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.done.wait(), 3)
                    await asyncio.to_thread(self.start_worker, name)
                    continue
                mode = self.rng.choices([f for f, _ in FAULTS], [w for _, w in FAULTS])[0]
                with contextlib.suppress(httpx.HTTPError):
                    await http.post(f"http://127.0.0.1:{self.ports[name]}/fake/mode", json=mode)
                    self.faults[json.dumps(mode, sort_keys=True)] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.done.wait(), self.rng.uniform(0.5, 1.5))

    async def sample_memory(self, pid: int, out: list[tuple[float, float]], t0: float) -> None:
        while not self.done.is_set():
            out.append((time.monotonic() - t0, rss_mb(pid)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), 1.0)
        out.append((time.monotonic() - t0, rss_mb(pid)))


def gateway_counts(metrics_text: str) -> tuple[dict[str, int], float]:
    """`turnout_requests_total` by status (summed over its other labels), and the in-flight gauge."""
    by_status: collections.Counter[str] = collections.Counter()
    in_flight = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "turnout_requests_total" and s.value:
                by_status[s.labels["status"]] += int(s.value)
            elif s.name == "turnout_in_flight_requests":
                in_flight = s.value
    return dict(by_status), in_flight


def run_soak(requests: int, rate: float, tmp: Path, seed: int = 7, routed: Routed | None = None,
             panic: bool = True) -> SoakResult:
    """Run one soak (see the module docstring) and return what it saw."""
    soak = Soak(tmp, rate, seed, routed, panic)
    cfg_path = tmp / "gateway.yaml"
    cfg_path.write_text(yaml.safe_dump(soak.config()))
    with contextlib.ExitStack() as stack:
        for name in soak.ports:
            soak.start_worker(name)
        def close_workers() -> None:
            for proc in soak.workers.values():
                proc.close()

        stack.callback(close_workers)
        gateway = stack.enter_context(gateway_process(cfg_path, soak.gw_port, tmp / "gateway.log",
                                                      log_level="warning"))
        url = f"http://127.0.0.1:{soak.gw_port}"
        samples: list[tuple[float, float]] = []

        async def main() -> float:
            t0 = time.monotonic()
            await asyncio.gather(soak.load(f"{url}/v1", requests), soak.chaos(),
                                 soak.sample_memory(gateway.pid, samples, t0))
            return time.monotonic() - t0

        seconds = asyncio.run(main())
        # The last requests' accounting may still be running as their responses go out: wait (a while) until
        # the gateway has counted as many as the client saw and has none in flight.
        deadline = time.monotonic() + 10
        while True:
            by_status, in_flight = gateway_counts(httpx.get(f"{url}/metrics", timeout=10).text)
            settled = in_flight == 0 and sum(by_status.values()) >= sum(soak.counts.values())
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    return SoakResult(requests=requests, seconds=seconds, client=dict(soak.counts), gateway=by_status,
                      malformed=soak.malformed, rss_mb=samples, faults=dict(soak.faults), in_flight_after=in_flight)


def plot(result: SoakResult, path: Path) -> None:
    """RSS over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([t for t, _ in result.rss_mb], [m for _, m in result.rss_mb], lw=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("gateway RSS (MiB)")
    ax.set_title(f"Soak: {result.requests} requests under worker faults")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Run the soak and write JSON, markdown and a plot of the gateway's memory."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=80.0, help="requests per second")
    ap.add_argument("--routed", action="store_true",
                    help="cost_aware routing over the bundled table's models and prompts")
    ap.add_argument("--embedder", choices=["static", "onnx"], default="static", help="the routed gateway's embedder")
    ap.add_argument("--panic", action=argparse.BooleanOptionalAction, default=True,
                    help="the gateway's panic mode (reliability.panic); --no-panic refuses when no worker is available")
    ap.add_argument("--out", type=Path, default=None,
                    help="default loadtest/results/soak, or soak-routed with --routed")
    args = ap.parse_args()
    out = args.out or REPO / "loadtest" / "results" / ("soak-routed" if args.routed else "soak")
    routed = Routed.from_bundled_table(seed=7, embedder=args.embedder) if args.routed else None
    result = run_soak(args.requests, args.rate, Path(tempfile.mkdtemp(prefix="turnout-soak-")), routed=routed,
                      panic=args.panic)
    first, last = result.rss_minutes()
    plot(result, out.with_suffix(".png"))
    if routed:
        setup = (f"One gateway process routing with the `cost_aware` policy (artifact trained on the bundled table, "
                 f"lambda 0.5) and the {routed.embedder} embedder (default settings: cache of 10,000 prompts), "
                 f"over the table's {len(routed.models)} models, each served by two of three fake workers, on "
                 f"{os.cpu_count()} CPUs. "
                 f"Prompts: the table's {len(routed.prompts)} unique prompts in a seeded order, cycled.")
        named = "a table model named directly"
    else:
        setup = (f"One gateway process, three fake workers (two replicas of `fake-small`, one `fake-big`) on "
                 f"{os.cpu_count()} CPUs.")
        named = "a model named directly"
    command = f"python -m loadtest.soak --requests {args.requests} --rate {args.rate:g}"
    command += (" --routed" + (f" --embedder {routed.embedder}" if routed.embedder != "static" else "")
                if routed else "")
    command += "" if args.panic else " --no-panic"
    refused = result.client.get("no_healthy_worker", 0)
    lines = [
        f"# Soak: {result.requests} requests at {args.rate:g}/s under worker faults"
        + (f", routed (cost_aware, {routed.embedder} embedder)" if routed else ""),
        "",
        setup + " A chaos task gives a random worker a new fault about every second "
        "(500s, hangs, streams cut after 2 chunks, 300 ms answers, or healed) and crashes one (SIGKILL) every "
        f"15 s, restarting it 3 s later. Requests: 60% chat, 25% streamed, 10% {named}, "
        "5% invalid (400), from the `openai` SDK.",
        "",
        f"Command: `{command}`.",
        "",
        f"- Duration: {result.seconds:.0f} s.",
        f"- Client-side outcomes: {dict(sorted(result.client.items()))}.",
        f"- Panic mode {'on' if args.panic else 'off'}: `no_healthy_worker` {refused} of {result.requests} requests "
        f"({refused / result.requests:.1%}).",
        f"- Gateway `turnout_requests_total` by status: {dict(sorted(result.gateway.items()))}.",
        f"- Equal: {result.client == result.gateway}; malformed responses: {len(result.malformed)}; "
        f"in-flight gauge after: {result.in_flight_after:g}.",
        f"- Gateway RSS, median of the first minute {first:.1f} MiB, of the last minute {last:.1f} MiB "
        f"({(last / first - 1) * 100:+.1f}%); highest sample {max(m for _, m in result.rss_mb):.1f} MiB.",
        f"- Chaos actions: {dict(sorted(result.faults.items()))}.",
        "",
        f"![RSS]({out.with_suffix('.png').name})",
    ]
    data = {"requests": result.requests, "rate": args.rate, "routed": routed is not None, "panic": args.panic,
            "seconds": result.seconds, "client": result.client,
            "gateway": result.gateway, "malformed": result.malformed, "rss_mb": result.rss_mb,
            "rss_first_minute_mb": first, "rss_last_minute_mb": last, "faults": result.faults,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    write_results(out, data, "\n".join(lines))


if __name__ == "__main__":
    main()
