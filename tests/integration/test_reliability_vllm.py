"""A real vLLM CPU worker killed mid-stream, then found dead before its first byte: the stream ends with an
error event and `[DONE]`, and the next requests are answered by the policy's fallback model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest

from testkit.engines import has_avx2, vllm_process, vllm_ready
from testkit.procs import free_port
from testkit.promtext import sample_sum
from tests.conftest import serve_gateway, start_fake
from tests.integration.test_reliability import gateway_config, stream_killing, worker

pytestmark = pytest.mark.vllm
MSG: list[Any] = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def test_vllm_killed_mid_stream_then_the_fallback_answers(tmp_path: Path, stack: ExitStack) -> None:
    if not has_avx2():
        pytest.skip("the vLLM CPU build needs AVX2, which this CPU lacks")
    if not vllm_ready():
        pytest.fail("the vLLM worker is not set up: run `make vllm` (make test does it first)")
    # Its own vLLM server (not the session's shared one): this test kills it.
    port = free_port()
    vllm = stack.enter_context(vllm_process(port, tmp_path / "vllm.log"))
    big = stack.enter_context(start_fake("fake-big", tmp_path))
    small = {"name": "small", "model": "gemma3-270m", "base_url": f"http://127.0.0.1:{port}/v1",
             "price": {"input_per_1m": 0.1, "output_per_1m": 0.2}}
    cfg = gateway_config([small, worker("big", big, "fake-big", 1.0)],
                         policies={"pair": {"type": "weighted", "weights": {"small": 1_000_000, "big": 1}}})
    cfg["default_policy"] = "pair"
    proc, url = serve_gateway(cfg, tmp_path)
    stack.enter_context(proc)

    body = {"model": "auto", "messages": MSG, "max_tokens": 400, "stream": True, "ignore_eos": True}
    headers, events = stream_killing(url, body, vllm, after=5, timeout_s=120)
    assert headers["x-turnout-model"] == "small"
    assert events[-1] == "[DONE]", "the stream ends properly, never a silent truncation"
    assert json.loads(events[-2])["error"]["code"] == "upstream_stream_error"
    assert len(events) < 100, "the stream was cut by the kill, not run to its end"
    assert sample_sum(f"{url}/metrics", "turnout_requests_total", status="stream_error") == 1

    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as client:
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(model="auto", messages=MSG, max_tokens=4,
                                                                   stream=stream)
            assert raw.headers["x-turnout-model"] == "big"
            assert raw.headers["x-turnout-fallback-from"] == "gemma3-270m"
            parsed = raw.parse()
            if isinstance(parsed, openai.Stream):
                assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
            else:
                assert parsed.choices[0].message.content
    assert sample_sum(f"{url}/metrics", "turnout_requests_total", status="ok") == 2
