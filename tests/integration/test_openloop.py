"""The open-loop generator against a fake worker and a gateway process: every planned request is sent and
accounted for, streams get a time to first token, the gateway's overhead header is read, errors are counted
by kind; and every scenario file is valid."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest

from loadtest.openloop import REPO, arrivals, load_scenario, markdown, run
from tests.conftest import Upstream, fake_config, serve_gateway


@pytest.mark.parametrize("path", sorted((REPO / "loadtest" / "scenarios").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_scenario_file_is_valid(path: Path) -> None:
    sc = load_scenario(path, rate=7.0)
    assert sc.name == path.stem and sc.rate == 7.0


@pytest.mark.usefixtures("fake_reset")
def test_open_loop_through_a_gateway_and_direct(fakes: dict[str, Upstream], tmp_path: Path) -> None:
    sc = load_scenario(REPO / "loadtest" / "scenarios" / "chat-mixed.yaml", rate=40.0, duration_s=3.0,
                       model="small", stream_share=0.5)
    planned = len(arrivals(sc.rate, sc.duration_s, random.Random(sc.seed)))
    proc, url = serve_gateway(fake_config(fakes), tmp_path)
    with proc:
        through = asyncio.run(run(f"{url}/v1", sc))
        direct = asyncio.run(run(fakes["fake-small"].base_url, sc.model_copy(update={"model": "fake-small"})))
        httpx.post(f"{fakes['fake-small'].root}/fake/mode", json={"status": 500}, timeout=5).raise_for_status()
        failing = asyncio.run(run(f"{url}/v1", sc.model_copy(update={"duration_s": 1.0})))
    for result in (through, direct):
        s = result.summary()
        assert s["requests"] == planned and s["ok"] == planned and s["error_rate"] == 0
        assert s["latency_ms"] is not None and s["ttft_ms"] is not None
        assert s["latency_ms"]["p50"] <= s["latency_ms"]["p90"] <= s["latency_ms"]["p99"]
    assert through.summary()["overhead_ms"] is not None, "the gateway's overhead header is read"
    assert direct.summary()["overhead_ms"] is None, "a worker sends none"
    errors = failing.summary()["errors"]
    # 502 from the failing worker, then 503 once its breaker has opened.
    assert failing.summary()["ok"] == 0 and set(errors) <= {"http_502", "http_503"} and "http_502" in errors
    assert through.summary()["offered_rps"] == pytest.approx(planned / 3.0)
    assert "| http://" in markdown([through, direct])
