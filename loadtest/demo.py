"""`make demo-vllm`: the vLLM CPU worker behind the gateway, a handful of requests through the openai SDK,
and a table of what each cost in tokens, latency, time to first token and gateway overhead.

Uses the embedded default config `deploy/configs/local.yaml` (its worker URL pointed at the port the
worker got). Everything started here is stopped before it exits.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from rich.console import Console
from rich.table import Table

from testkit.engines import REPO, fake_process, gateway_process, has_avx2, vllm_process, vllm_ready
from testkit.procs import ManagedProcess, free_port

PROMPTS = [
    ("auto", "chat", False, "What is the capital of France?"),
    ("auto", "chat", True, "Write a haiku about railway switches."),
    ("turnout/cheap", "chat", True, "Explain what a load balancer does."),
    ("small", "chat", False, "List three prime numbers."),
    ("auto", "completions", False, "The quick brown fox"),
    ("auto", "completions", True, "Once upon a time"),
]
MAX_TOKENS = 24


@dataclass
class Row:
    """One request's measurements."""

    requested: str
    endpoint: str
    stream: bool
    answered_by: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    overhead_ms: float


Measured = tuple[Any, Any, float | None]  # response headers, usage, time to first token (s)


def _chat(client: openai.OpenAI, model: str, stream: bool, prompt: str, t0: float, extra: dict[str, Any]) -> Measured:
    messages: list[Any] = [{"role": "user", "content": prompt}]
    if not stream:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, extra_body=extra)
        return raw.headers, raw.parse().usage, None
    sraw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    usage, ttft = None, None
    for chunk in sraw.parse():
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        usage = chunk.usage or usage
    return sraw.headers, usage, ttft


def _completion(client: openai.OpenAI, model: str, stream: bool, prompt: str, t0: float,
                extra: dict[str, Any]) -> Measured:
    if not stream:
        raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                          extra_body=extra)
        return raw.headers, raw.parse().usage, None
    sraw = client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    usage, ttft = None, None
    for chunk in sraw.parse():
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
        usage = chunk.usage or usage
    return sraw.headers, usage, ttft


def send(client: openai.OpenAI, model: str, endpoint: str, stream: bool, prompt: str) -> Row:
    """Send one request and measure it from the client's side."""
    extra: dict[str, Any] = {"ignore_eos": True}  # exactly MAX_TOKENS tokens: comparable rows
    t0 = time.perf_counter()
    fn = _chat if endpoint == "chat" else _completion
    headers, usage, ttft = fn(client, model, stream, prompt, t0, extra)
    latency = time.perf_counter() - t0
    if usage is None:
        raise RuntimeError("the gateway did not relay usage although the client asked for it")
    return Row(model, endpoint, stream, headers["x-turnout-model"], usage.prompt_tokens,
               usage.completion_tokens, latency * 1000, None if ttft is None else ttft * 1000,
               float(headers["x-turnout-overhead-ms"]))


def start_worker(console: Console, tmp: Path) -> tuple[ManagedProcess, str, str]:
    """The real vLLM CPU worker where the CPU can run it, else the fake worker (said plainly)."""
    port = free_port()
    if has_avx2() and vllm_ready():
        console.print("[bold]Starting the vLLM CPU worker[/bold] (gemma3-270m; ready in about a minute)...")
        return vllm_process(port, tmp / "vllm.log"), f"http://127.0.0.1:{port}/v1", "gemma3-270m"
    reason = "this CPU lacks AVX2" if not has_avx2() else "the vLLM worker is not set up (make vllm)"
    console.print(f"[yellow]{reason}: using the fake worker instead of vLLM[/yellow]")
    return fake_process(port, "gemma3-270m", tmp / "fake.log"), f"http://127.0.0.1:{port}/v1", "gemma3-270m"


def main() -> None:
    """Run the demo and print its report."""
    console = Console(width=None if Console().is_terminal else 140)
    tmp = Path(tempfile.mkdtemp(prefix="turnout-demo-"))
    cfg = yaml.safe_load((REPO / "deploy" / "configs" / "local.yaml").read_text())
    worker, base_url, _ = start_worker(console, tmp)
    cfg["workers"][0]["base_url"] = base_url
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    gport = free_port()
    t_start = time.perf_counter()
    with worker:
        console.print(f"Worker ready in {time.perf_counter() - t_start:.0f} s; starting the gateway...")
        with gateway_process(tmp / "config.yaml", gport, tmp / "gateway.log") as gateway:
            url = f"http://127.0.0.1:{gport}"
            with openai.OpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0, timeout=120) as client:
                send(client, "auto", "chat", False, "warm-up")
                rows = [send(client, *p) for p in PROMPTS]
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            gateway.stop()
    report(console, rows, metrics, cfg)
    console.print(f"Logs in {tmp}. Everything started by the demo has stopped.")


def report(console: Console, rows: list[Row], metrics: str, cfg: dict[str, Any]) -> None:
    """Print the per-request table and the gateway's own totals."""
    table = Table(title=f"Turnout demo: {len(rows)} requests through the gateway ({MAX_TOKENS} tokens each)")
    for col in ("requested model", "endpoint", "stream", "answered by", "prompt tok", "completion tok",
                "latency ms", "TTFT ms", "gateway overhead ms"):
        table.add_column(col, justify="right" if "tok" in col or "ms" in col else "left")
    for r in rows:
        table.add_row(r.requested, r.endpoint, "yes" if r.stream else "no", r.answered_by, str(r.prompt_tokens),
                      str(r.completion_tokens), f"{r.latency_ms:.0f}",
                      "-" if r.ttft_ms is None else f"{r.ttft_ms:.0f}", f"{r.overhead_ms:.2f}")
    console.print(table)
    totals = {line.split(" ")[0].split("{")[0]: 0.0 for line in metrics.splitlines() if line.startswith("turnout_")}
    for line in metrics.splitlines():
        if line.startswith("turnout_") and not line.startswith("#"):
            name = line.split(" ")[0].split("{")[0]
            totals[name] += float(line.rsplit(" ", 1)[1])
    console.print(
        f"Gateway totals (from its /metrics): {totals.get('turnout_requests_total', 0):.0f} requests, "
        f"{totals.get('turnout_prompt_tokens_total', 0):.0f} prompt + "
        f"{totals.get('turnout_completion_tokens_total', 0):.0f} completion tokens, "
        f"${totals.get('turnout_cost_usd_total', 0):.8f} at the configured prices "
        f"({cfg['workers'][0]['price']})."
    )


if __name__ == "__main__":
    main()
