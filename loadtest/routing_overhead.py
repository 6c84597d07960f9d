"""Routing overhead (embed + score) at a fixed arrival rate, beside the `fixed` policy in the same run.

Trains a `knn` and a `cost_aware` artifact on llmrouter_9model with each embedder (ONNX MiniLM, static) through
`turnout train` (or reuses them from `~/.cache/turnout/bench-artifacts/`), starts nine fake workers (one per
artifact model, each answering after a fixed delay) and the gateway, then sends open-loop chat requests
(Poisson arrivals at 50 requests/s by default) with the official `openai` SDK. The load comes in blocks that
take turns between the phases, in an order rotated every round, so drift and noise from the rest of the
machine fall on every phase alike:

- `fixed`: the `fixed` policy (no embedding), the baseline for the gateway's own overhead;
- `knn_unique`, `cost_aware_unique`: learned policies on prompts the gateway has never seen (cache misses);
  the two draw disjoint prompts, since they share the gateway's embedding cache;
- `knn_repeated`: `knn` on 50 prompts embedded during the warm-up (cache hits: scoring only);
- `knn_unique_nowait`: `knn` on the same unique prompts as `knn_unique`, in the same order, through a second
  gateway whose micro-batcher does not wait for company (`embedder.max_wait_ms: 0`); skip it with
  `--no-nowait-phase`;
- `knn_unique_static`, `cost_aware_unique_static`: the same unique prompts through a third gateway that embeds
  with the static embedder (`embedder.backend: static`), its artifacts trained with `--embedder static`; skip
  them with `--no-static-phases`.

Within a block, requests leave at their planned times whatever is in flight. After a block the load pauses
until its last request is answered: a phase that cannot keep up leaves a backlog, reported as its drain time,
and that backlog must not land on the next phase. The run waits first for the machine to be quiet (other
work, such as someone's vLLM tests, would be measured with it) and reports the other work's CPU per phase.

Per request: `x-turnout-routing-ms`, `x-turnout-overhead-ms`, client latency, errors, how late the request
left against its planned arrival, and (from the gateway's request log) whether the embedding was cached.
Per block: CPU of every process and of the whole machine.

    python -m loadtest.routing_overhead [--rate 50] [--rounds 6] [--block-s 6] \\
        [--out loadtest/results/routing_overhead]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import openai
import yaml
from tokenizers import Tokenizer

from loadtest.overhead import cpu_seconds
from loadtest.results_io import write_results
from routers.embedding.factory import embedder_id
from routers.embedding.onnx import DEFAULT_TOKENIZER, MINILM_MAX_LENGTH
from routers.offline.dataset import RoutingData, load_table
from routers.offline.splits import train_test
from testkit.engines import BUNDLED_TABLE, PY_ENV, REPO, fake_process, gateway_process, table_prices
from testkit.procs import ManagedProcess, free_port

DATA = BUNDLED_TABLE
CACHE = Path(os.environ.get("TURNOUT_CACHE", Path.home() / ".cache" / "turnout"))
ARTIFACTS = CACHE / "bench-artifacts"
TARGET_P50_MS, TARGET_P99_MS, TARGET_RPS = 8.0, 25.0, 50.0
REPEATED_PROMPTS = 50
LAMBDA = 0.5
FIXED_MODEL = "llama-3.1-nemotron-51b-instruct"  # the best single model: what a `fixed` deployment would pick
MAX_TOKENS = 16
PIECE_BUCKETS = ((0, 32), (33, 64), (65, 128), (129, MINILM_MAX_LENGTH))
ROUTERS = ("knn", "cost_aware")


@dataclass(frozen=True, slots=True)
class Phase:
    """One kind of traffic: which gateway, which policy, which prompts."""

    name: str
    label: str
    gateway: str  # "main", "nowait" or "static"
    policy: str
    prompts: str  # "mixed" (cycled; never embedded), "unique_knn", "unique_cost_aware" or "repeated"


PHASES = (
    Phase("fixed", "(a) fixed policy", "main", "fixed", "mixed"),
    Phase("knn_unique", "(b) knn, unique prompts", "main", "knn", "unique_knn"),
    Phase("cost_aware_unique", "(c) cost_aware, unique prompts", "main", "cost_aware", "unique_cost_aware"),
    Phase("knn_repeated", "(d) knn, repeated prompts", "main", "knn", "repeated"),
    Phase("knn_unique_nowait", "(e) knn, unique prompts, max_wait_ms 0", "nowait", "knn", "unique_knn"),
    Phase("knn_unique_static", "(f) knn, static embedder, unique prompts", "static", "knn", "unique_knn"),
    Phase("cost_aware_unique_static", "(g) cost_aware, static embedder, unique prompts", "static", "cost_aware",
          "unique_cost_aware"),
)
#: Each gateway's embedder settings (`embedder:` in its config) and the embedder its artifacts are trained with.
GATEWAYS: dict[str, tuple[dict[str, Any], str]] = {
    "main": ({"backend": "onnx"}, "onnx"),
    "nowait": ({"backend": "onnx", "max_wait_ms": 0}, "onnx"),
    "static": ({"backend": "static"}, "static"),
}


@dataclass(frozen=True, slots=True)
class Pools:
    """The prompts each kind of phase draws from."""

    repeated: list[str]
    unique_knn: list[str]
    unique_cost_aware: list[str]
    mixed: list[str]
    test_share: dict[str, int]  # how many prompts of each unique pool come from the test split


@dataclass(frozen=True, slots=True)
class Block:
    """`seconds` of arrivals given to one phase (round -1: the warm-up); `redo_of` names the block it replaces
    when other work disturbed that one."""

    index: int
    round: int
    phase: str
    seconds: float
    redo_of: int | None = None


@dataclass(frozen=True, slots=True)
class Arrival:
    """One planned request: when (seconds after its block starts), where and what."""

    at: float
    block: int
    phase: str
    gateway: str
    policy: str
    prompt: str


@dataclass(slots=True)
class Sample:
    """What one request measured."""

    arrival: Arrival
    lag_ms: float = 0.0
    e2e_ms: float = 0.0
    error: str | None = None
    routing_ms: float | None = None
    overhead_ms: float | None = None
    model: str | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRun:
    """How one block went: when it started, when its last request was answered, CPU at both ends."""

    block: Block
    started: float
    drained: float
    cpu_start: CpuSnapshot
    cpu_end: CpuSnapshot
    waited_quiet_s: float  # spent waiting, before the block, for other work on the machine to stop

    @property
    def drain_s(self) -> float:
        """Seconds from the block's planned end to its last answer: the backlog it left."""
        return max(0.0, self.drained - self.started - self.block.seconds)

    @property
    def others_cores(self) -> float:
        """Cores used by processes other than the benchmark's during the block."""
        return self.cpu_start.others_cores(self.cpu_end)


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds so far: per process group of the benchmark, and the whole machine's busy time."""

    wall: float
    gateways: dict[str, float]
    fakes: float
    client: float
    machine: float

    def ours(self) -> float:
        """CPU seconds of all the benchmark's processes."""
        return sum(self.gateways.values()) + self.fakes + self.client

    def others_cores(self, later: CpuSnapshot) -> float:
        """Cores busy with work outside the benchmark between this snapshot and `later`."""
        ours = later.ours() - self.ours()
        return max(0.0, (later.machine - self.machine - ours) / max(later.wall - self.wall, 1e-9))


# ---------------------------------------------------------------------------------------------- helpers


def dist(values: Sequence[float]) -> dict[str, float] | None:
    """n, mean, median, p90, p99 and max of `values` (None when empty)."""
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {"n": len(values), "mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)),
            "p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


def pick(d: dict[str, float] | None, key: str) -> float | None:
    """`d[key]`, or None when there is no distribution."""
    return None if d is None else d[key]


def cache_state(cached: dict[str, bool | None], request_id: str | None) -> str:
    """A request's embedding per the gateway's log: hit, miss, none (no embedding) or unknown (no log line)."""
    if request_id is None or request_id not in cached:
        return "unknown"
    value = cached[request_id]
    return "none" if value is None else ("hit" if value else "miss")


def machine_busy_s() -> float:
    """The whole machine's busy CPU time so far (every core; steal counts as busy: someone else's work)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def machine_load(seconds: float) -> dict[str, Any]:
    """Load averages, and the cores busy over the next `seconds` (nothing of ours runs meanwhile)."""
    load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    w0, b0 = time.perf_counter(), machine_busy_s()
    time.sleep(seconds)
    cores = (machine_busy_s() - b0) / (time.perf_counter() - w0)
    return {"loadavg_1_5_15": load, "cores_busy": round(cores, 3), "sampled_s": seconds}


def wait_until_quiet(max_cores: float, max_wait_s: float) -> dict[str, Any]:
    """Sample the machine until other work uses at most `max_cores` (a shared machine: someone else's tests or
    vLLM servers would be measured with ours), for up to `max_wait_s`; the last sample, the wait, and whether
    it got quiet."""
    t = time.perf_counter()
    while True:
        load = machine_load(3.0)
        waited = time.perf_counter() - t
        if load["cores_busy"] <= max_cores or waited >= max_wait_s:
            return {**load, "waited_s": round(waited, 1), "quiet": load["cores_busy"] <= max_cores}
        print(f"the machine is busy ({load['cores_busy']:.2f} cores in use by other processes, load average "
              f"{load['loadavg_1_5_15']}); waiting for it to be quiet ({waited:.0f}/{max_wait_s:.0f} s)", flush=True)
        time.sleep(10)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a markdown table ('-' when missing)."""
    return "-" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------- artifacts


def ensure_artifacts(table: Path, data: RoutingData, retrain: bool, embedder: str) -> dict[str, dict[str, Any]]:
    """A `knn` and a `cost_aware` artifact trained on `table` by `turnout train --embedder <embedder>`, reused
    when one trained on the same table with that embedder is already in the cache. Missing ones are trained in
    parallel (one core each)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    info: dict[str, dict[str, Any]] = {}
    jobs: dict[str, tuple[subprocess.Popen[bytes], Path, float]] = {}
    suffix = "" if embedder == "onnx" else f"-{embedder}"
    for router in ROUTERS:
        out = ARTIFACTS / f"{table.parent.name}-{router}{suffix}"
        meta_path = out / "meta.json"
        if not retrain and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if (meta.get("router") == router and meta.get("data_hash") == data.data_hash
                    and meta.get("embedder") == embedder_id(embedder)):
                info[router] = {"path": str(out), "version": meta["version"], "embedder": meta["embedder"],
                                "reused": True, "train_wall_s": None}
                continue
        log = ARTIFACTS / f".{out.name}.train.log"
        cmd = [sys.executable, "-m", "server", "train", "--data", str(table), "--router", router, "--out", str(out),
               "--embedder", embedder]
        print(f"training {router}: {' '.join(cmd)}", flush=True)
        with log.open("wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                    env={**os.environ, **PY_ENV})
        jobs[router] = (proc, log, time.perf_counter())
    for router, (proc, log, started) in jobs.items():
        code = proc.wait()
        out = ARTIFACTS / f"{table.parent.name}-{router}{suffix}"
        if code != 0 or not (out / "meta.json").exists():
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"`turnout train --router {router}` failed (exit {code}); log {log}:\n{tail}")
        meta = json.loads((out / "meta.json").read_text())
        info[router] = {"path": str(out), "version": meta["version"], "embedder": meta["embedder"],
                        "reused": False, "train_wall_s": round(time.perf_counter() - started, 1)}
    return info


# ---------------------------------------------------------------------------------------------- prompts and schedule


def make_pools(data: RoutingData, seed: int) -> Pools:
    """Real prompts, split so that no unique prompt is seen twice by one gateway.

    The test split alone (381 prompts once those also in train are dropped) lasts under 8 s at 50 requests/s,
    so the unique pools take the test prompts first and then training prompts. The router has seen a training
    prompt's scores, but embedding and scoring it costs the same: the kNN search is brute force over the index.
    """
    train_rows, test_rows = train_test(data)
    rng = random.Random(seed)
    test = list(dict.fromkeys(data.prompts[i] for i in test_rows))
    test_set = set(test)
    train = [p for p in dict.fromkeys(data.prompts[i] for i in train_rows) if p not in test_set]
    rng.shuffle(test)
    rng.shuffle(train)
    repeated, rest = train[:REPEATED_PROMPTS], train[REPEATED_PROMPTS:]
    # Test prompts first within each pool, so a short run still uses them; the order after is random.
    knn = test[0::2] + rest[0::2]
    cost_aware = test[1::2] + rest[1::2]
    mixed = knn + cost_aware
    rng.shuffle(mixed)
    return Pools(repeated=repeated, unique_knn=knn, unique_cost_aware=cost_aware, mixed=mixed,
                 test_share={"unique_knn": len(test[0::2]), "unique_cost_aware": len(test[1::2])})


def arrival_times(start: float, end: float, rate: float, poisson: bool, rng: np.random.Generator) -> list[float]:
    """Arrival times in [start, end): a Poisson process at `rate`, or evenly spaced."""
    if not poisson:
        return [float(t) for t in np.arange(start, end, 1.0 / rate)]
    out: list[float] = []
    t = start + float(rng.exponential(1.0 / rate))
    while t < end:
        out.append(t)
        t += float(rng.exponential(1.0 / rate))
    return out


class Planner:
    """The blocks of a run and, when each starts, its arrivals: each phase draws prompts from its own source, so a
    block re-run after a disturbance gets fresh unique prompts."""

    def __init__(self, phases: Sequence[Phase], pools: Pools, rate: float, poisson: bool, seed: int) -> None:
        self.phases = {p.name: p for p in phases}
        self.pools, self.rate, self.poisson = pools, rate, poisson
        self.rng = np.random.default_rng(seed)
        self.sources: dict[str, Iterator[str]] = {
            p.name: (itertools.cycle(getattr(pools, p.prompts)) if p.prompts in ("mixed", "repeated")
                     else iter(getattr(pools, p.prompts)))
            for p in phases
        }
        self._warm: list[Arrival] = []

    def blocks(self, rounds: int, block_s: float) -> list[Block]:
        """A warm-up block, then `rounds` rounds of one block per phase, the order rotated every round."""
        # Warm-up, evenly spaced at the same rate: every repeated prompt through each policy of each gateway, so
        # that the repeated set is cached, the ONNX session and the routers have run, and connections are open.
        targets = [("main", "knn"), ("main", "cost_aware"), ("main", "fixed")]
        used = {(p.gateway, p.policy) for p in self.phases.values() if p.gateway != "main"}
        targets += sorted(used)
        warm = [(gw, pol, prompt) for prompt in self.pools.repeated for gw, pol in targets]
        self._warm = [Arrival(i / self.rate, 0, "warmup", gw, pol, prompt) for i, (gw, pol, prompt) in enumerate(warm)]
        out = [Block(0, -1, "warmup", len(warm) / self.rate)]
        names = list(self.phases)
        for r in range(rounds):
            for name in [*names[r % len(names):], *names[: r % len(names)]]:
                out.append(Block(len(out), r, name, block_s))
        return out

    def needed(self, rounds: int, block_s: float) -> None:
        """Fail early when the unique pools cannot last the run (with room for re-runs)."""
        for p in self.phases.values():
            if p.prompts.startswith("unique"):
                pool, want = len(getattr(self.pools, p.prompts)), rounds * block_s * self.rate
                if want * 1.2 > pool:
                    raise SystemExit(f"phase {p.name} needs about {want:.0f} unique prompts (+20% for re-runs), "
                                     f"the table has {pool}; use fewer --rounds or a shorter --block-s")

    def arrivals(self, block: Block) -> list[Arrival]:
        """The block's requests, times relative to its start."""
        if block.phase == "warmup":
            return self._warm
        phase = self.phases[block.phase]
        out = []
        for at in arrival_times(0.0, block.seconds, self.rate, self.poisson, self.rng):
            prompt = next(self.sources[phase.name], None)
            if prompt is None:
                raise RuntimeError(f"phase {phase.name}: its unique prompts ran out (too many re-runs)")
            out.append(Arrival(at, block.index, phase.name, phase.gateway, phase.policy, prompt))
        return out


def word_pieces(prompts: Sequence[str]) -> dict[str, int]:
    """Word pieces per prompt as the embedder sees them ([CLS] and [SEP] included, truncated at 256)."""
    tok = Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    tok.no_padding()
    tok.no_truncation()
    unique = list(dict.fromkeys(prompts))
    return {p: min(len(e.ids), MINILM_MAX_LENGTH) for p, e in zip(unique, tok.encode_batch(unique), strict=True)}


# ---------------------------------------------------------------------------------------------- processes


def write_config(path: Path, ports: dict[str, int], artifacts: dict[str, dict[str, Any]], models: list[str],
                 prices: dict[str, float], policies: Sequence[str], embedder: dict[str, Any]) -> None:
    """A gateway config: one worker per artifact model (each its own fake), the benchmark's policies."""
    workers = [{"name": f"fake{i}", "model": m, "base_url": f"http://127.0.0.1:{ports[m]}/v1",
                "price": {"input_per_1m": prices[m], "output_per_1m": prices[m]}} for i, m in enumerate(models)]
    specs: dict[str, Any] = {"fixed": {"type": "fixed", "worker": f"fake{models.index(FIXED_MODEL)}"}}
    for router in ROUTERS:
        # The artifacts' model names are the workers' model names, so no `models:` mapping is needed.
        specs[router] = {"type": router, "artifact": artifacts[router]["path"], "lambda": LAMBDA}
    cfg = {"workers": workers, "policies": {k: v for k, v in specs.items() if k in policies},
           "default_policy": policies[0], "embedder": embedder}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def start(stack: contextlib.ExitStack, proc: ManagedProcess, what: str) -> ManagedProcess:
    """Enter `proc` on `stack` (stopped however the run ends); a failure to start names the process."""
    try:
        return stack.enter_context(proc)
    except RuntimeError as exc:
        raise RuntimeError(f"{what} did not start: {exc}") from exc


def request_log(path: Path) -> dict[str, bool | None]:
    """`embed_cached` by request id, from the gateway's JSON request log lines."""
    out: dict[str, bool | None] = {}
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict) and "request_id" in rec:
                out[str(rec["request_id"])] = rec.get("embed_cached")
    return out


# ---------------------------------------------------------------------------------------------- load


@dataclass(frozen=True, slots=True)
class Gate:
    """When a block may start and when it counts: other work below `quiet_cores` before it (waiting at most
    `max_wait_s`), and below `disturbed_cores` during it, else it is run again (at most `max_redos` times)."""

    quiet_cores: float
    disturbed_cores: float
    max_wait_s: float
    max_redos: int


async def until_quiet(snapshot: Callable[[], CpuSnapshot], gate: Gate) -> float:
    """Wait until other work uses at most `gate.quiet_cores` over a second (ours is idle between blocks, so what
    is busy is someone else); the seconds waited beyond that second."""
    t = time.perf_counter()
    while True:
        s0 = snapshot()
        await asyncio.sleep(1.0)
        others = s0.others_cores(snapshot())
        waited = time.perf_counter() - t - 1.0
        if others <= gate.quiet_cores or waited >= gate.max_wait_s:
            return waited
        print(f"  other work uses {others:.2f} cores: waiting before the next block ({waited:.0f} s)", flush=True)
        await asyncio.sleep(4.0)


async def drive(planner: Planner, blocks: Sequence[Block], urls: dict[str, str],
                snapshot: Callable[[], CpuSnapshot], gate: Gate) -> tuple[list[Sample], list[BlockRun]]:
    """Run the blocks in turn. Within a block, send each request at its planned time whatever is still in flight
    (open loop); then wait until the block's last request is answered, so that a backlog one phase builds up is
    not charged to the next, and until the machine is quiet. A block during which other work used more than
    `gate.disturbed_cores` is run again at the end."""
    # Keep-alive below the gateway's (uvicorn's 5 s): a gateway idle for a block closes its connections, and
    # the client must not reuse one at the moment it closes.
    limits = httpx2.Limits(max_connections=512, max_keepalive_connections=512, keepalive_expiry=4.0)
    samples: list[Sample] = []
    runs: list[BlockRun] = []
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, openai.AsyncOpenAI] = {}
        for gw, url in urls.items():
            http = await stack.enter_async_context(httpx2.AsyncClient(limits=limits, timeout=30, trust_env=False))
            clients[gw] = openai.AsyncOpenAI(base_url=url, api_key="bench", http_client=http, max_retries=0)

        async def fire(a: Arrival, t0: float) -> None:
            sent = time.perf_counter()
            s = Sample(a, lag_ms=(sent - t0 - a.at) * 1000)
            messages: list[Any] = [{"role": "user", "content": a.prompt}]
            headers: Any = None
            try:
                raw = await clients[a.gateway].chat.completions.with_raw_response.create(
                    model=f"turnout/{a.policy}", messages=messages, max_tokens=MAX_TOKENS)
                headers = raw.headers
            except openai.APIStatusError as exc:
                s.error, headers = f"HTTP {exc.status_code}", exc.response.headers
            except openai.APIError as exc:  # connection refused, timeout: no response at all
                s.error = type(exc).__name__
            s.e2e_ms = (time.perf_counter() - sent) * 1000
            if headers is not None:
                for key, attr in (("x-turnout-routing-ms", "routing_ms"), ("x-turnout-overhead-ms", "overhead_ms")):
                    if key in headers:
                        setattr(s, attr, float(headers[key]))
                s.model, s.request_id = headers.get("x-turnout-model"), headers.get("x-turnout-request-id")
            samples.append(s)

        queue = list(blocks)
        redos = 0
        while queue:
            block = queue.pop(0)
            waited = await until_quiet(snapshot, gate)
            arrivals = planner.arrivals(block)
            cpu0, t0 = snapshot(), time.perf_counter()
            tasks: list[asyncio.Task[None]] = []
            for a in arrivals:
                delay = t0 + a.at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(fire(a, t0)))
            await asyncio.sleep(max(0.0, t0 + block.seconds - time.perf_counter()))
            await asyncio.gather(*tasks)
            run = BlockRun(block, t0, time.perf_counter(), cpu0, snapshot(), waited)
            runs.append(run)
            errors = sum(1 for s in samples if s.arrival.block == block.index and s.error is not None)
            note = ""
            if block.round >= 0 and run.others_cores > gate.disturbed_cores:
                if redos < gate.max_redos:
                    redos += 1
                    queue.append(Block(len(blocks) + redos - 1, block.round, block.phase, block.seconds,
                                       redo_of=block.index))
                    note = " - DISTURBED, run again at the end"
                else:
                    note = " - DISTURBED, no re-runs left"
            print(f"  block {block.index:2d} round {block.round + 1} {block.phase:18s} {len(tasks):4d} requests, "
                  f"{errors} errors, drained {run.drain_s:.2f} s after its end, other work "
                  f"{run.others_cores:.2f} cores{note}", flush=True)
    return samples, runs


# ---------------------------------------------------------------------------------------------- summary


def counted_runs(runs: Sequence[BlockRun], gate: Gate) -> list[BlockRun]:
    """The measured blocks the statistics use: those other work did not disturb, or, for a phase with none left
    undisturbed, all of its blocks (the report flags the phase)."""
    measured = [r for r in runs if r.block.round >= 0]
    clean = [r for r in measured if r.others_cores <= gate.disturbed_cores]
    phases_clean = {r.block.phase for r in clean}
    return clean + [r for r in measured if r.block.phase not in phases_clean]


def summarise(phases: Sequence[Phase], runs: Sequence[BlockRun], samples: Sequence[Sample],
              cached: dict[str, bool | None], pieces: dict[str, int], rate: float) -> dict[str, Any]:
    """Per-phase statistics: latencies, errors, achieved rate, backlog, cache hits, CPU, per round and by prompt
    length."""
    out: dict[str, Any] = {}
    for phase in phases:
        mine = [r for r in runs if r.block.phase == phase.name]
        ids = {r.block.index for r in mine}
        ss = [s for s in samples if s.arrival.block in ids]
        ok = [s for s in ss if s.error is None]
        seconds = sum(r.block.seconds for r in mine)
        cpu = {k: sum(getattr(r.cpu_end, k) - getattr(r.cpu_start, k) for r in mine)
               for k in ("wall", "fakes", "client", "machine")}
        cpu[phase.gateway] = sum(r.cpu_end.gateways[phase.gateway] - r.cpu_start.gateways[phase.gateway]
                                 for r in mine)
        ours = sum(r.cpu_end.ours() - r.cpu_start.ours() for r in mine)
        hits = Counter(cache_state(cached, s.request_id) for s in ok)
        by_round = []
        for r in mine:
            rs = [s.routing_ms for s in ok if s.arrival.block == r.block.index and s.routing_ms is not None]
            os_ = [s.overhead_ms for s in ok if s.arrival.block == r.block.index and s.overhead_ms is not None]
            r_d, o_d = dist(rs), dist(os_)
            by_round.append({"round": r.block.round + 1,
                             "requests": sum(1 for s in ss if s.arrival.block == r.block.index),
                             "routing_p50": pick(r_d, "p50"), "routing_p99": pick(r_d, "p99"),
                             "overhead_p50": pick(o_d, "p50"), "overhead_p99": pick(o_d, "p99"),
                             "drain_s": r.drain_s})
        by_len = {}
        for lo, hi in PIECE_BUCKETS:
            rs = [s.routing_ms for s in ok if s.routing_ms is not None and lo <= pieces[s.arrival.prompt] <= hi]
            by_len[f"{lo}-{hi}"] = dist(rs)
        # A queue that grows through the block (arrivals faster than the gateway serves them) shows as routing
        # times rising from the block's first quarter to its last.
        quarter = mine[0].block.seconds / 4 if mine else 0.0
        first = [s.routing_ms for s in ok if s.routing_ms is not None and s.arrival.at < quarter]
        last = [s.routing_ms for s in ok if s.routing_ms is not None and s.arrival.at >= 3 * quarter]
        out[phase.name] = {
            "label": phase.label, "gateway": phase.gateway, "policy": phase.policy, "prompts": phase.prompts,
            "blocks": len(mine), "max_others_cores": max(r.others_cores for r in mine),
            "requests": len(ss), "errors": len(ss) - len(ok),
            "error_kinds": dict(Counter(s.error for s in ss if s.error)),
            "seconds": seconds, "achieved_rps": len(ss) / seconds, "target_rps": rate,
            # Answers per second from each block's start to its last answer: what the gateway kept up with.
            "completed_rps": len(ok) / cpu["wall"],
            "drain_s": {"mean": float(np.mean([r.drain_s for r in mine])), "max": max(r.drain_s for r in mine)},
            "routing_p50_ms_by_quarter": {"first": pick(dist(first), "p50"), "last": pick(dist(last), "p50")},
            "distinct_prompts": len({s.arrival.prompt for s in ss}),
            "mean_word_pieces": float(np.mean([pieces[s.arrival.prompt] for s in ss])) if ss else None,
            "routing_ms": dist([s.routing_ms for s in ok if s.routing_ms is not None]),
            "overhead_ms": dist([s.overhead_ms for s in ok if s.overhead_ms is not None]),
            "e2e_ms": dist([s.e2e_ms for s in ok]),
            "send_lag_ms": dist([s.lag_ms for s in ss]),
            "embed_cache": dict(hits),
            "chosen_models": dict(Counter(s.model or "" for s in ok).most_common()),
            "cpu": {
                "gateway_ms_per_request": (cpu[phase.gateway] / len(ss) * 1000) if ss else None,
                "fakes_ms_per_request": (cpu["fakes"] / len(ss) * 1000) if ss else None,
                "client_ms_per_request": (cpu["client"] / len(ss) * 1000) if ss else None,
                "machine_cores_busy": cpu["machine"] / cpu["wall"],
                "benchmark_cores_busy": ours / cpu["wall"],
                "other_cores_busy": max(0.0, (cpu["machine"] - ours) / cpu["wall"]),
            },
            "routing_ms_by_word_pieces": by_len,
            "by_round": by_round,
        }
    return out


def comparisons(phases: dict[str, Any]) -> dict[str, Any]:
    """Overhead of each routed phase against `fixed`, the cache's effect, and the micro-batcher's wait."""
    def q(name: str, metric: str, p: str) -> float | None:
        d = phases.get(name, {}).get(metric)
        return None if d is None else float(d[p])

    out: dict[str, Any] = {"overhead_vs_fixed": {}}
    for name in phases:
        if name == "fixed":
            continue
        row: dict[str, float | None] = {}
        for p in ("p50", "p90", "p99"):
            routed, fixed = q(name, "overhead_ms", p), q("fixed", "overhead_ms", p)
            row[f"{p}_ratio"] = routed / fixed if routed is not None and fixed else None
            row[f"{p}_extra_ms"] = routed - fixed if routed is not None and fixed is not None else None
        out["overhead_vs_fixed"][name] = row
    if "knn_unique" in phases and "knn_repeated" in phases:
        out["cache_effect_knn"] = {
            f"{metric}_{p}_{kind}": q(name, metric, p)
            for metric in ("routing_ms", "overhead_ms") for p in ("p50", "p99")
            for kind, name in (("unique", "knn_unique"), ("repeated", "knn_repeated"))
        }
    for router in ROUTERS:
        minilm, static = f"{router}_unique", f"{router}_unique_static"
        if minilm in phases and static in phases:
            out.setdefault("static_vs_minilm", {})[router] = {
                f"{metric}_{p}_{kind}": q(name, metric, p)
                for metric in ("routing_ms", "overhead_ms") for p in ("p50", "p99")
                for kind, name in (("minilm", minilm), ("static", static))
            }
    if "knn_unique" in phases and "knn_unique_nowait" in phases:
        out["batching_wait_knn"] = {
            f"routing_ms_{p}_{kind}": q(name, "routing_ms", p)
            for p in ("p50", "p90", "p99")
            for kind, name in (("wait_2ms", "knn_unique"), ("nowait", "knn_unique_nowait"))
        }
    return out


def verdicts(phases: dict[str, Any], rate: float) -> dict[str, Any]:
    """The issue's target for every routed phase: routing p50 <= 8 ms and p99 <= 25 ms at 50 requests/s."""
    out: dict[str, Any] = {}
    for name, ph in phases.items():
        if ph["policy"] == "fixed" or ph["routing_ms"] is None:
            continue
        p50, p99 = ph["routing_ms"]["p50"], ph["routing_ms"]["p99"]
        out[name] = {"p50_ms": p50, "p50_met": p50 <= TARGET_P50_MS, "p99_ms": p99, "p99_met": p99 <= TARGET_P99_MS,
                     "achieved_rps": ph["achieved_rps"],
                     # Poisson counts over ~40 s vary by a few percent; more than 5% short means the load was not there.
                     "rate_met": ph["achieved_rps"] >= 0.95 * rate and ph["errors"] == 0,
                     # Answers over block + drain well below arrivals: the gateway did not keep up.
                     "overloaded": ph["completed_rps"] < 0.9 * ph["achieved_rps"]}
    return out


# ---------------------------------------------------------------------------------------------- output


def plot(path: Path, phases: Sequence[Phase], samples: Sequence[Sample], pieces: dict[str, int]) -> None:
    """CDFs of routing and overhead ms per phase, and routing ms against prompt length; PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_r, ax_o, ax_l = fig.subplots(1, 3)
    for phase in phases:
        ok = [s for s in samples if s.arrival.phase == phase.name and s.error is None]
        for ax, attr in ((ax_r, "routing_ms"), (ax_o, "overhead_ms")):
            vals = np.sort([v for s in ok if (v := getattr(s, attr)) is not None])
            if vals.size:
                ax.plot(vals, np.arange(1, vals.size + 1) / vals.size, label=phase.label, linewidth=1.4)
        if phase.prompts.startswith("unique"):
            xs = [pieces[s.arrival.prompt] for s in ok if s.routing_ms is not None]
            ys = [s.routing_ms for s in ok if s.routing_ms is not None]
            ax_l.scatter(xs, ys, s=4, alpha=0.35, label=phase.label)
    for ax, title in ((ax_r, "x-turnout-routing-ms (embed + score)"), (ax_o, "x-turnout-overhead-ms")):
        ax.set_xscale("log")
        ax.set_xlabel("ms (log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(True, alpha=0.3, which="both")
    for ax in (ax_r, ax_o):
        ax.axhline(0.5, color="grey", linewidth=0.6)
    ax_r.axvline(TARGET_P50_MS, color="black", linestyle="--", linewidth=0.8, label="targets: p50 8 ms, p99 25 ms")
    ax_r.axvline(TARGET_P99_MS, color="black", linestyle=":", linewidth=0.8)
    ax_r.axhline(0.99, color="grey", linewidth=0.6)
    ax_r.legend(fontsize=7, loc="lower right")
    ax_o.legend(fontsize=7, loc="lower right")
    ax_l.set_yscale("log")
    ax_l.set_xlabel("prompt word pieces (as embedded, at most 256)")
    ax_l.set_ylabel("routing ms (log scale)")
    ax_l.set_title("cache misses: routing time against prompt length")
    ax_l.axhline(TARGET_P99_MS, color="black", linestyle=":", linewidth=0.8)
    ax_l.grid(True, alpha=0.3, which="both")
    ax_l.legend(fontsize=7, loc="upper left", markerscale=3)
    fig.tight_layout()
    fig.savefig(path, format="png")


def where_time_goes(ph: dict[str, Any]) -> list[str]:
    """Markdown lines splitting the gateway's CPU per request by what each phase adds to the one before."""
    def cpu(name: str) -> float | None:
        return ph[name]["cpu"]["gateway_ms_per_request"] if name in ph else None

    fixed, hit, miss = cpu("fixed"), cpu("knn_repeated"), cpu("knn_unique")
    if fixed is None or hit is None or miss is None:
        return []
    return ["", "## Where the gateway's CPU goes (ms of gateway process CPU per request, same run)", "",
            f"- `fixed`: {fixed:.2f}. knn on a cache hit (scoring only): {hit:.2f}, so scoring adds {hit - fixed:.2f}. "
            f"knn on a cache miss: {miss:.2f}, so embedding one prompt adds {miss - hit:.2f}.",
            f"- At {ph['knn_unique']['target_rps']:g} requests/s of cache misses that is "
            f"{miss * ph['knn_unique']['target_rps'] / 1000:.2f} cores for the gateway alone, on a "
            f"{os.cpu_count()}-core machine also running the load client "
            f"({ph['knn_unique']['cpu']['client_ms_per_request']:.2f} ms/request) and the fake workers "
            f"({ph['knn_unique']['cpu']['fakes_ms_per_request']:.2f} ms/request).",
            *([f"- knn with the static embedder on a cache miss: {static:.2f}, so embedding one prompt adds "
               f"{static - hit:.2f} there (its gateway runs only the static policies)."]
              if (static := cpu("knn_unique_static")) is not None else [])]


def disturbance(result: dict[str, Any]) -> list[str]:
    """Markdown lines on other work sharing the machine: before the run, blocks run again, and warnings."""
    lb, cfg = result["machine"]["load_before"], result["config"]
    blocks = [b for b in result["blocks"] if b["round"] > 0]
    disturbed = [b for b in blocks if b["others_cores"] > cfg["disturbed_cores"]]
    left_out = [b for b in blocks if not b["counted"]]
    waited = sum(b["waited_quiet_s"] for b in result["blocks"])
    lines = [f"Machine before the run: {lb['cores_busy']:.2f} cores busy with other work (waited {lb['waited_s']:g} s "
             f"for it to drop to {cfg['quiet_cores']:g}). Blocks waited {waited:.0f} s in all for other work to stop. "
             f"{len(disturbed)} of {len(blocks)} blocks were disturbed by other work (more than "
             f"{cfg['disturbed_cores']:g} cores), {len(left_out)} of them left out"
             + (": " + ", ".join(f"{b['phase']} round {b['round']} ({b['others_cores']:.2f} cores)" for b in left_out)
                if left_out else "") + ".", ""]
    if not lb["quiet"]:
        lines += ["Other work was still running when the wait before the run ran out; from then on each block waited "
                  "for quiet on its own, and the blocks it still disturbed are listed above.", ""]
    flagged = [p["label"] for p in result["phases"].values() if p["max_others_cores"] > cfg["disturbed_cores"]]
    if flagged:
        lines += [f"**Warning: {', '.join(flagged)} had no undisturbed block left; its numbers include other "
                  "processes' load.**", ""]
    return lines


def markdown(result: dict[str, Any], command: str) -> str:
    """The results as a markdown report."""
    ph, cfg, m = result["phases"], result["config"], result["machine"]
    lines = [
        f"# Routing overhead at {cfg['rate_rps']:g} requests/s (embed + score), beside the `fixed` policy",
        "",
        f"One run on {m['cpus']} CPUs ({m['cpu_model']}, Python {m['python']}), shared by the load client, "
        f"{len(cfg['gateways'])} gateway(s) ({', '.join(cfg['gateways'])}) and nine fake workers (one per model of "
        f"the artifacts, each answering after {cfg['worker_latency_ms']:g} ms).",
        f"Open-loop {cfg['arrivals']} arrivals at {cfg['rate_rps']:g} requests/s from the `openai` SDK "
        f"(`AsyncOpenAI`, non-streaming, max_tokens {MAX_TOKENS}); {cfg['rounds']} rounds of one "
        f"{cfg['block_s']:g} s block per phase, the order rotated every round, after a "
        f"{cfg['warmup_s']:.0f} s warm-up. After each block the load pauses until its last request is answered, "
        "so a backlog left by one phase is not charged to the next ('drain' is how long that took after the "
        "block's arrivals ended), and until the machine is quiet: a block during which other processes used more "
        f"than {cfg['disturbed_cores']:g} cores is run again and left out. Artifacts trained by `turnout train` "
        "on llmrouter_9model, " + "; ".join(
            f"with the {emb} embedder: knn {arts['knn']['version']}, cost_aware {arts['cost_aware']['version']}"
            for emb, arts in result["artifacts"].items())
        + f"; lambda {LAMBDA}. Embedder settings: gateway defaults (LRU cache 10,000 prompts, micro-batches of up "
        "to 32, `max_wait_ms` 2 for MiniLM and 0 for static) except where a phase says otherwise.",
        "",
        f"Command: `{command}`",
        "",
        *([f"**Experiment: the gateways ran with extra environment {cfg['gateway_env']}.**", ""]
          if cfg["gateway_env"] else []),
        *disturbance(result),
        "## Per phase",
        "",
        "| phase | requests (errors) | sent / completed req/s | routing ms p50 / p90 / p99 "
        "| overhead ms p50 / p90 / p99 | client latency ms p50 / p99 | embed cache hit / miss "
        "| drain s mean / max | routing p50 ms, block's first / last quarter |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in ph.values():
        r, o, e = p["routing_ms"] or {}, p["overhead_ms"] or {}, p["e2e_ms"] or {}
        cache = p["embed_cache"]
        cache_s = "-" if p["policy"] == "fixed" else f"{cache.get('hit', 0)} / {cache.get('miss', 0)}"
        lines.append(
            f"| {p['label']} | {p['requests']} ({p['errors']}) | {p['achieved_rps']:.1f} / {p['completed_rps']:.1f} "
            f"| {fmt(r.get('p50'), 3)} / {fmt(r.get('p90'), 3)} / {fmt(r.get('p99'), 3)} "
            f"| {fmt(o.get('p50'), 3)} / {fmt(o.get('p90'), 3)} / {fmt(o.get('p99'), 3)} "
            f"| {fmt(e.get('p50'))} / {fmt(e.get('p99'))} | {cache_s} "
            f"| {p['drain_s']['mean']:.2f} / {p['drain_s']['max']:.2f} "
            f"| {fmt(p['routing_p50_ms_by_quarter']['first'])} / {fmt(p['routing_p50_ms_by_quarter']['last'])} |")
    lines += ["", "## The issue's target: routing p50 <= 8 ms and p99 <= 25 ms at 50 requests/s", ""]
    for name, v in result["targets"]["phases"].items():
        lines.append(f"- {ph[name]['label']}: p50 {v['p50_ms']:.2f} ms ({'met' if v['p50_met'] else 'NOT met'}), "
                     f"p99 {v['p99_ms']:.2f} ms ({'met' if v['p99_met'] else 'NOT met'}) at "
                     f"{v['achieved_rps']:.1f} requests/s{'' if v['rate_met'] else ' (rate or errors NOT as asked)'}.")
        if v["overloaded"]:
            lines.append(f"  Overloaded: requests arrived at {v['achieved_rps']:.1f}/s but completed at "
                         f"{ph[name]['completed_rps']:.1f}/s, so the queue grew through every block (routing p50 "
                         f"{fmt(ph[name]['routing_p50_ms_by_quarter']['first'])} ms in a block's first quarter, "
                         f"{fmt(ph[name]['routing_p50_ms_by_quarter']['last'])} ms in its last); these percentiles "
                         f"grow with the block length ({cfg['block_s']:g} s) and are not a steady state.")
    lines += ["", "## Gateway overhead, routed vs `fixed` (same run)", "",
              "| phase | overhead p50 ratio (extra ms) | p90 ratio (extra ms) | p99 ratio (extra ms) |",
              "|---|---|---|---|"]
    for name, row in result["comparisons"]["overhead_vs_fixed"].items():
        cells = [f"{fmt(row[f'{p}_ratio'], 1)}x ({fmt(row[f'{p}_extra_ms'])})" for p in ("p50", "p90", "p99")]
        lines.append(f"| {ph[name]['label']} | {' | '.join(cells)} |")
    lines += where_time_goes(ph)
    ce = result["comparisons"].get("cache_effect_knn")
    if ce:
        lines += ["", "## Cache effect (knn, same run)", "",
                  f"- routing ms p50 {ce['routing_ms_p50_unique']:.3f} (unique prompts) -> "
                  f"{ce['routing_ms_p50_repeated']:.3f} (repeated); p99 {ce['routing_ms_p99_unique']:.3f} -> "
                  f"{ce['routing_ms_p99_repeated']:.3f}.",
                  f"- overhead ms p50 {ce['overhead_ms_p50_unique']:.3f} -> {ce['overhead_ms_p50_repeated']:.3f}; "
                  f"p99 {ce['overhead_ms_p99_unique']:.3f} -> {ce['overhead_ms_p99_repeated']:.3f}."]
    for router, sv in result["comparisons"].get("static_vs_minilm", {}).items():
        if router == ROUTERS[0]:
            lines += ["", "## Static embedder vs MiniLM (the same unique prompts, same run)", ""]
        lines.append(f"- {router}: routing ms p50 {sv['routing_ms_p50_minilm']:.3f} (MiniLM) -> "
                     f"{sv['routing_ms_p50_static']:.3f} (static); p99 {sv['routing_ms_p99_minilm']:.3f} -> "
                     f"{sv['routing_ms_p99_static']:.3f}; overhead p50 {sv['overhead_ms_p50_minilm']:.3f} -> "
                     f"{sv['overhead_ms_p50_static']:.3f}, p99 {sv['overhead_ms_p99_minilm']:.3f} -> "
                     f"{sv['overhead_ms_p99_static']:.3f}.")
    bw = result["comparisons"].get("batching_wait_knn")
    if bw:
        lines += ["", "## Micro-batching wait (knn, the same unique prompts in the same order, second gateway)", "",
                  f"- routing ms p50 / p90 / p99 with `max_wait_ms` 2 (default): {bw['routing_ms_p50_wait_2ms']:.3f} / "
                  f"{bw['routing_ms_p90_wait_2ms']:.3f} / {bw['routing_ms_p99_wait_2ms']:.3f}; with 0: "
                  f"{bw['routing_ms_p50_nowait']:.3f} / {bw['routing_ms_p90_nowait']:.3f} / "
                  f"{bw['routing_ms_p99_nowait']:.3f}."]
    unique = next(p for p in ph.values() if p["prompts"].startswith("unique"))  # any: the buckets are the same
    lines += ["", "## Routing ms by prompt length (word pieces as embedded), cache misses", "",
              "| phase | " + " | ".join(f"{k} pieces: p50 / p99 (n)" for k in unique["routing_ms_by_word_pieces"])
              + " | mean pieces |",
              "|---|" + "---|" * (len(PIECE_BUCKETS) + 1)]
    for p in ph.values():
        if not p["prompts"].startswith("unique"):
            continue
        cells = [("-" if d is None else f"{d['p50']:.2f} / {d['p99']:.2f} ({d['n']})")
                 for d in p["routing_ms_by_word_pieces"].values()]
        lines.append(f"| {p['label']} | {' | '.join(cells)} | {fmt(p['mean_word_pieces'], 1)} |")
    width = max(len(p["by_round"]) for p in ph.values())
    lines += ["", "## Each counted block: routing ms p50 / p99 (drain s), by round - noise and backlog check", "",
              "| phase | " + " | ".join(f"block {i + 1}" for i in range(width)) + " |", "|---|" + "---|" * width]
    for p in ph.values():
        cells = [f"r{r['round']}: {fmt(r['routing_p50'])} / {fmt(r['routing_p99'])} ({r['drain_s']:.1f})"
                 for r in sorted(p["by_round"], key=lambda r: int(r["round"]))]
        lines.append(f"| {p['label']} | {' | '.join(cells + ['-'] * (width - len(cells)))} |")
    lb, la = m["load_before"], m["load_after"]
    lines += [
        "", "## CPU", "",
        f"- Before (no benchmark process running): load average {lb['loadavg_1_5_15']}, "
        f"{lb['cores_busy']:.2f} cores busy over {lb['sampled_s']:g} s. After: load average {la['loadavg_1_5_15']}, "
        f"{la['cores_busy']:.2f} cores busy.",
        "",
        "CPU per request and cores busy are over each block's arrivals and its drain.",
        "",
        "| phase | gateway ms/req | fakes ms/req | client ms/req | cores busy: machine / benchmark / others "
        "| send lag ms p50 / p99 / max |",
        "|---|---|---|---|---|---|",
    ]
    for p in ph.values():
        c, lag = p["cpu"], p["send_lag_ms"] or {}
        lines.append(f"| {p['label']} | {fmt(c['gateway_ms_per_request'])} | {fmt(c['fakes_ms_per_request'])} "
                     f"| {fmt(c['client_ms_per_request'])} | {c['machine_cores_busy']:.2f} / "
                     f"{c['benchmark_cores_busy']:.2f} / {c['other_cores_busy']:.2f} "
                     f"| {fmt(lag.get('p50'))} / {fmt(lag.get('p99'))} / {fmt(lag.get('max'))} |")
    pools = result["prompts"]
    lines += [
        "", "## Notes", "",
        "- `x-turnout-routing-ms` is the time from choosing the policy to its decision: the wait for the embedding "
        "(cache lookup, or micro-batch window + queue + model) plus scoring. `x-turnout-overhead-ms` is all of the "
        "gateway's time except the wait on the worker, so it includes the routing time.",
        f"- Unique prompts are real llmrouter_9model prompts, each sent once per gateway: the test split first "
        f"({pools['test_share']['unique_knn']} + {pools['test_share']['unique_cost_aware']} of them), then training "
        "prompts (the test split alone lasts under 8 s at 50 requests/s). Embedding and brute-force kNN cost the "
        "same for either. Repeated prompts: 50 training prompts, embedded during the warm-up.",
        "- Cache hit/miss per request comes from the gateway's request log (`embed_cached`); the gateways run at "
        "their default log level (info), which writes that line for every request in every phase.",
        "- Send lag is how late a request left the client against its planned arrival: it shows whether the SDK "
        "client kept the arrival rate (the load client shares the 2 cores with everything else).",
        f"- The fixed policy always sends to {FIXED_MODEL}; the learned policies spread over the nine fakes.",
    ]
    return "\n".join([*lines, ""])


# ---------------------------------------------------------------------------------------------- main


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Train or reuse the artifacts, start the processes, drive the load, write JSON, markdown and a plot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rate", type=float, default=TARGET_RPS, help="arrivals per second")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block-s", type=float, default=6.0, help="seconds of arrivals per phase block")
    ap.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    ap.add_argument("--worker-latency-ms", type=float, default=20.0, help="each fake worker's answer delay")
    ap.add_argument("--nowait-phase", action=argparse.BooleanOptionalAction, default=True,
                    help="also run knn on a second gateway with embedder.max_wait_ms 0")
    ap.add_argument("--static-phases", action=argparse.BooleanOptionalAction, default=True,
                    help="also run knn and cost_aware on a third gateway with the static embedder")
    ap.add_argument("--minilm-phases", action=argparse.BooleanOptionalAction, default=True,
                    help="the learned phases with the MiniLM embedder ((b)-(e)); without them: fixed and static only")
    ap.add_argument("--retrain", action="store_true", help="train the artifacts even when cached")
    ap.add_argument("--quiet-cores", type=float, default=0.3,
                    help="start the run and each block when other processes use at most this many cores...")
    ap.add_argument("--wait-quiet-s", type=float, default=900, help="...or after waiting this long (then flagged)")
    ap.add_argument("--disturbed-cores", type=float, default=0.3,
                    help="a block during which other processes used more cores than this is run again")
    ap.add_argument("--max-redos", type=int, default=12, help="at most this many blocks are run again")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the gateways, for experiments (e.g. OPENBLAS_NUM_THREADS=1); "
                         "the committed results use none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "routing_overhead")
    args = ap.parse_args()
    # SIGTERM (and SIGINT, which a shell ignores in background jobs) must unwind the ExitStack below, so that the
    # workers and gateways, each in its own process group, are stopped rather than orphaned.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    command = "python -m loadtest.routing_overhead " + " ".join(sys.argv[1:])
    started = time.perf_counter()

    data = load_table(args.data)
    phases = [p for p in PHASES if (args.nowait_phase or p.gateway != "nowait")
              and (args.static_phases or p.gateway != "static")
              and (args.minilm_phases or p.gateway == "static" or p.policy == "fixed")]
    gateways = list(dict.fromkeys(["main", *(p.gateway for p in phases)]))
    artifacts = {emb: ensure_artifacts(args.data, data, args.retrain, emb)
                 for emb in dict.fromkeys(GATEWAYS[gw][1] for gw in gateways)}
    models = sorted(data.models)
    prices = table_prices(args.data, models)
    pools = make_pools(data, args.seed)
    planner = Planner(phases, pools, args.rate, args.arrivals == "poisson", args.seed)
    planner.needed(args.rounds, args.block_s)
    blocks = planner.blocks(args.rounds, args.block_s)
    gate = Gate(args.quiet_cores, args.disturbed_cores, args.wait_quiet_s, args.max_redos)
    if any("=" not in kv for kv in args.gateway_env):
        ap.error("--gateway-env takes KEY=VALUE")
    gateway_env = dict(kv.split("=", 1) for kv in args.gateway_env)
    pieces = word_pieces([*pools.mixed, *pools.repeated])

    load_before = wait_until_quiet(args.quiet_cores, args.wait_quiet_s)
    tmp = Path(tempfile.mkdtemp(prefix="turnout-routing-overhead-"))
    ports = {m: free_port() for m in models}
    gw_ports = {gw: free_port() for gw in gateways}
    for gw in gateways:
        policies = ("fixed", "knn", "cost_aware") if gw == "main" else tuple(
            dict.fromkeys(p.policy for p in phases if p.gateway == gw))
        embedder_cfg, embedder = GATEWAYS[gw]
        write_config(tmp / f"{gw}.yaml", ports, artifacts[embedder], models, prices, policies, embedder_cfg)
    ok = False
    try:
        with contextlib.ExitStack() as stack:
            fakes = [start(stack, fake_process(ports[m], m, tmp / f"fake-{i}.log", "--latency-ms",
                                               str(args.worker_latency_ms)), f"fake worker for {m}")
                     for i, m in enumerate(models)]
            procs: dict[str, ManagedProcess] = {}
            for gw in gateways:
                proc = gateway_process(tmp / f"{gw}.yaml", gw_ports[gw], tmp / f"gateway-{gw}.log", "info")
                proc.timeout_s = 120  # loading the ONNX model and both artifacts on a busy 2-core machine
                proc.env = {**(proc.env or {}), **gateway_env}
                procs[gw] = start(stack, proc, f"gateway '{gw}' (config {tmp / f'{gw}.yaml'})")

            def snapshot() -> CpuSnapshot:
                return CpuSnapshot(
                    wall=time.perf_counter(), gateways={gw: cpu_seconds(p.pid) for gw, p in procs.items()},
                    fakes=sum(cpu_seconds(f.pid) for f in fakes), client=time.process_time(),
                    machine=machine_busy_s())

            urls = {gw: f"http://127.0.0.1:{gw_ports[gw]}/v1" for gw in gateways}
            print(f"{len(phases)} phases x {args.rounds} rounds x {args.block_s:g} s at {args.rate:g} requests/s, "
                  f"after a {blocks[0].seconds:g} s warm-up", flush=True)
            samples, runs = asyncio.run(drive(planner, blocks, urls, snapshot, gate))
        # Stopped: the request logs are complete.
        cached = {k: v for gw in gateways for k, v in request_log(tmp / f"gateway-{gw}.log").items()}
        load_after = machine_load(3.0)
        counted = counted_runs(runs, gate)
        phase_stats = summarise(phases, counted, samples, cached, pieces, args.rate)
        result: dict[str, Any] = {
            "command": command,
            "config": {"rate_rps": args.rate, "arrivals": args.arrivals, "rounds": args.rounds, "block_s": args.block_s,
                       "warmup_s": blocks[0].seconds, "worker_latency_ms": args.worker_latency_ms,
                       "nowait_phase": args.nowait_phase, "static_phases": args.static_phases,
                       "minilm_phases": args.minilm_phases,
                       "gateways": gateways, "seed": args.seed, "lambda": LAMBDA,
                       "quiet_cores": args.quiet_cores, "disturbed_cores": args.disturbed_cores,
                       "max_redos": args.max_redos,
                       "max_tokens": MAX_TOKENS, "client": "openai.AsyncOpenAI over httpx2, max_retries 0",
                       "gateway_log_level": "info", "gateway_env": gateway_env},
            "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
                        "load_before": load_before, "load_after": load_after},
            "artifacts": artifacts,
            "prompts": {"test_share": pools.test_share, "unique_knn": len(pools.unique_knn),
                        "unique_cost_aware": len(pools.unique_cost_aware), "repeated": len(pools.repeated)},
            "phases": phase_stats,
            "blocks": [{"index": r.block.index, "round": r.block.round + 1, "phase": r.block.phase,
                        "redo_of": r.block.redo_of, "seconds": r.block.seconds,
                        "requests": sum(1 for s in samples if s.arrival.block == r.block.index),
                        "others_cores": round(r.others_cores, 3), "waited_quiet_s": round(r.waited_quiet_s, 1),
                        "drain_s": round(r.drain_s, 3), "counted": r in counted} for r in runs],
            "comparisons": comparisons(phase_stats),
            "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS, "rate_rps": TARGET_RPS,
                        "phases": verdicts(phase_stats, args.rate)},
            "wall_s": None,
        }
        result["wall_s"] = round(time.perf_counter() - started, 1)
        md = markdown(result, command)
        write_results(args.out, result, md)
        ids = {r.block.index for r in counted}
        plot(args.out.with_suffix(".png"), phases, [s for s in samples if s.arrival.block in ids], pieces)
        print(f"wrote {args.out.with_suffix('.json')}, .md, .png in {result['wall_s']} s")
        ok = True
    finally:
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"processes' logs and configs kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    main()
