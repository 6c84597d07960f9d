"""Starting the processes the tests, benchmarks and demo run against: vLLM CPU, fake workers, the gateway."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from routers.offline.prices import read_models_json_prices
from testkit.procs import ManagedProcess

REPO = Path(__file__).resolve().parents[1]
VLLM_CACHE = Path(os.environ.get("TURNOUT_CACHE", Path.home() / ".cache" / "turnout"))
#: The operations token of gateways started for tests, benchmarks and the demo: with client keys on, their /metrics
#: and /ui/status.json need it (`server.api.credentials`); `OPS_HEADERS` presents it.
OPS_TOKEN = "turnout-test-operations-token-0123456789"
OPS_HEADERS = {"x-turnout-metrics-token": OPS_TOKEN}
PY_ENV = {"PYTHONPATH": str(REPO), "TURNOUT_METRICS_TOKEN": OPS_TOKEN}
#: The routing table that ships with the project (see data/llmrouter_9model/NOTICE.md).
BUNDLED_TABLE = REPO / "data" / "llmrouter_9model" / "data.parquet"


def table_prices(table: Path, models: Sequence[str]) -> dict[str, float]:
    """Each model's input price (USD per 1M tokens) from the models.json beside `table`, 0 where it has none; the
    benchmarks give a worker that price for input and output alike."""
    prices = read_models_json_prices(table.parent / "models.json") or {}
    return {m: prices.get(m, (0.0, 0.0))[0] for m in models}


def has_avx2() -> bool:
    """vLLM's CPU build needs AVX2."""
    try:
        return any(line.startswith("flags") and " avx2" in line
                   for line in Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return False


#: The models `deploy/vllm-cpu/setup.sh` builds; `start.sh` serves the one TURNOUT_VLLM_MODEL names.
VLLM_MODELS = ("gemma3-270m", "smollm2-135m")


def vllm_ready(model: str = "gemma3-270m") -> bool:
    """True when `deploy/vllm-cpu/setup.sh` has built the worker's virtualenv and `model` (one of VLLM_MODELS)."""
    return ((VLLM_CACHE / "vllm-venv" / "bin" / "python").exists()
            and (VLLM_CACHE / "models" / model / ".turnout-ready").exists())


#: vLLM's own options for serving every API the gateway relays: tool calls in Hermes's format (`<tool_call>`
#: tags; a tool marked `strict` is held to its schema by the structural tag, so `required` and named tool choices
#: give valid calls even from a small base model), and Responses API responses kept in memory, which
#: `previous_response_id`, retrieval and cancel need.
ALL_APIS_ARGS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
ALL_APIS_ENV = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}


def vllm_process(port: int, log_path: Path, name: str | None = None, cores: str = "",
                 args: tuple[str, ...] = (), model: str = "gemma3-270m",
                 env: dict[str, str] | None = None) -> ManagedProcess:
    """A vLLM CPU server on loopback (not yet started); ready takes about a minute. `model`: which built model
    to serve (one of VLLM_MODELS: gemma3-270m, Gemma 3 270M base, or smollm2-135m, SmolLM2-135M-Instruct);
    `name`: the served model name or several, comma-separated (default: the model's own); `args`: more vLLM
    server arguments; `env`: more environment (see `ALL_APIS_ARGS` and `ALL_APIS_ENV`)."""
    if model not in VLLM_MODELS:
        raise ValueError(f"unknown vLLM model {model!r}; known: {', '.join(VLLM_MODELS)}")
    cmd = ["bash", str(REPO / "deploy" / "vllm-cpu" / "start.sh"), str(port), name or model, cores, *args]
    return ManagedProcess(cmd, ready_url=f"http://127.0.0.1:{port}/health", log_path=log_path, timeout_s=400,
                          env={"TURNOUT_VLLM_MODEL": model, **(env or {})})


def otlp_receiver_process(port: int, log_path: Path | None = None) -> ManagedProcess:
    """An OTLP/HTTP trace receiver (`testkit.otlp_receiver`; not yet started): `GET /spans` lists what it got."""
    return ManagedProcess([sys.executable, "-m", "testkit.otlp_receiver", "--port", str(port)],
                          ready_url=f"http://127.0.0.1:{port}/health", log_path=log_path, env=PY_ENV, cwd=REPO,
                          timeout_s=30)


def fake_process(port: int, model: str, log_path: Path | None = None, *args: str) -> ManagedProcess:
    """A fake OpenAI-compatible worker (not yet started)."""
    return ManagedProcess(
        [sys.executable, "-m", "testkit.fakes.worker", "--port", str(port), "--model", model, *args],
        ready_url=f"http://127.0.0.1:{port}/health", log_path=log_path, env=PY_ENV, cwd=REPO, timeout_s=30,
    )


def gateway_process(config: Path, port: int, log_path: Path | None = None,
                    log_level: str = "info") -> ManagedProcess:
    """The gateway (`python -m server serve`) on loopback (not yet started)."""
    return ManagedProcess(
        [sys.executable, "-m", "server", "serve", "--config", str(config), "--port", str(port),
         "--log-level", log_level],
        ready_url=f"http://127.0.0.1:{port}/healthz", log_path=log_path, env=PY_ENV, cwd=REPO, timeout_s=30,
    )
