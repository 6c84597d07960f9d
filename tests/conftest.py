"""Shared fixtures: fake workers and a real vLLM worker on real ports, and the gateway in process or
as a real server process. Clients are always the official `openai` SDK."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
import yaml
from fastapi import FastAPI

from routers.embedding.base import Embedder
from server.app import create_app
from server.config import TurnoutConfig, parse_config
from testkit.engines import (
    ALL_APIS_ARGS,
    ALL_APIS_ENV,
    OPS_HEADERS,
    OPS_TOKEN,
    fake_process,
    gateway_process,
    has_avx2,
    otlp_receiver_process,
    vllm_process,
    vllm_ready,
)
from testkit.procs import ManagedProcess, free_port

# In-process gateways read the operations token from this process's environment (processes get it in `PY_ENV`).
os.environ["TURNOUT_METRICS_TOKEN"] = OPS_TOKEN


@dataclass(frozen=True)
class Upstream:
    """A worker process on a real port."""

    model: str
    base_url: str  # ends with /v1
    proc: ManagedProcess

    @property
    def root(self) -> str:
        """URL without the /v1 suffix (for /health, /metrics, /fake/*)."""
        return self.base_url.removesuffix("/v1")


def start_fake(model: str, tmp: Path, *args: str) -> ManagedProcess:
    """A fake worker process (not yet started)."""
    port = free_port()
    return fake_process(port, model, tmp / f"fake-{model}-{port}.log", *args)


def _port_of(proc: ManagedProcess) -> int:
    return int(proc.cmd[proc.cmd.index("--port") + 1])


@pytest.fixture(scope="session")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Upstream]]:
    """Two fake workers, `fake-small` and `fake-big`, shared by the session (tests reset their mode)."""
    tmp = tmp_path_factory.mktemp("fakes")
    procs = {m: start_fake(m, tmp) for m in ("fake-small", "fake-big")}
    with ExitStack() as stack:
        for p in procs.values():
            stack.enter_context(p)
        yield {m: Upstream(m, f"http://127.0.0.1:{_port_of(p)}/v1", p) for m, p in procs.items()}


@pytest.fixture
def fake_reset(fakes: dict[str, Upstream]) -> Iterator[None]:
    """Reset every fake's fault mode and stats around a test."""
    def reset() -> None:
        for up in fakes.values():
            httpx.post(f"{up.root}/fake/mode", json={}, timeout=5).raise_for_status()
            httpx.post(f"{up.root}/fake/reset", timeout=5).raise_for_status()
    reset()
    yield
    reset()


def fake_config(fakes: dict[str, Upstream], **overrides: Any) -> dict[str, Any]:
    """A config mapping over the two fakes with `fixed` and `weighted` policies."""
    raw: dict[str, Any] = {
        "workers": [
            {"name": "small", "model": "fake-small", "base_url": fakes["fake-small"].base_url,
             "price": {"input_per_1m": 0.1, "output_per_1m": 0.2}},
            {"name": "big", "model": "fake-big", "base_url": fakes["fake-big"].base_url,
             "price": {"input_per_1m": 1.0, "output_per_1m": 3.0}},
        ],
        "policies": {
            "cheap": {"type": "fixed", "worker": "small"},
            "split": {"type": "weighted", "weights": {"small": 1, "big": 1}, "seed": 7},
        },
        "default_policy": "cheap",
        "server": {"health_interval_s": 0.5},
    }
    raw.update(overrides)
    return raw


@dataclass
class InProcess:
    """The gateway app running in this process, with an async openai client and a raw httpx2 client."""

    app: FastAPI
    client: openai.AsyncOpenAI
    http: httpx2.AsyncClient


@asynccontextmanager
async def gateway_in_process(config: TurnoutConfig | dict[str, Any] | Path,
                             embedder: Embedder | None = None) -> AsyncIterator[InProcess]:
    """Run the app (with its lifespan) and talk to it through ASGI, no socket. A config file path is
    also what `/admin/reload` re-reads; `embedder` replaces the configured one."""
    if isinstance(config, Path):
        app = create_app(config_path=config, embedder=embedder)
    else:
        cfg = config if isinstance(config, TurnoutConfig) else parse_config(config)
        app = create_app(cfg, embedder=embedder)
    async with app.router.lifespan_context(app):
        await app.state.gateway.health.visit_all()
        transport = httpx2.ASGITransport(app=app)
        # The operations token rides on every request: /metrics answers tests whether or not keys are on.
        async with httpx2.AsyncClient(transport=transport, base_url="http://gateway", headers=OPS_HEADERS) as http:
            client = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="test", http_client=http,
                                        max_retries=0)
            yield InProcess(app, client, http)


def serve_gateway(config: dict[str, Any], tmp: Path) -> tuple[ManagedProcess, str]:
    """A gateway process on a real port, not yet started; returns it and its URL."""
    port = free_port()
    cfg_path = tmp / f"gateway-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    return gateway_process(cfg_path, port, tmp / f"gateway-{port}.log"), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """A real vLLM CPU server (gemma3-270m) for the session, serving every API the gateway relays (tools, stored
    responses); skipped, with the reason, only without AVX2."""
    if not has_avx2():
        pytest.skip("the vLLM CPU build needs AVX2, which this CPU lacks")
    if not vllm_ready():
        pytest.fail("the vLLM worker is not set up: run `make vllm` (make test does it first)")
    port = free_port()
    proc = vllm_process(port, tmp_path_factory.mktemp("vllm") / "vllm.log", args=ALL_APIS_ARGS, env=ALL_APIS_ENV)
    with proc:
        yield Upstream("gemma3-270m", f"http://127.0.0.1:{port}/v1", proc)


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An OTLP/HTTP trace receiver process for the module (`testkit.otlp_receiver`): its base URL."""
    port = free_port()
    with otlp_receiver_process(port, tmp_path_factory.mktemp("otlp") / "receiver.log"):
        yield f"http://127.0.0.1:{port}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every integration test (real processes: Redis, Prometheus, vLLM, the gateway on a port) is `slow`, so
    `make unit` (`-m "not slow"`) stays fast; slow tests elsewhere carry the marker themselves."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)
