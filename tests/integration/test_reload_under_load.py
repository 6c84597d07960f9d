"""Hot reload under load: a real gateway process, 200 streaming requests in flight, five reloads.

Every request must complete, and every request sent after a reload answered must use the new policy.
The long streams are slow (a token every 250 ms for 10 s), so each spans all five reloads; the gateway's
in-flight gauge, read after each reload, shows them still open.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from testkit.promtext import sample_sum
from tests.conftest import Upstream, fake_config, serve_gateway

MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "count slowly"}]
KEY = "reload-test-admin-key-of-32-characters"
LONG_TOKENS = 40


def config_with_default(fakes: dict[str, Upstream], policy: str) -> dict[str, Any]:
    raw = fake_config(fakes)
    raw["policies"]["pricey"] = {"type": "fixed", "worker": "big"}
    raw["default_policy"] = policy
    return raw


async def stream_once(client: openai.AsyncOpenAI, tokens: int, itl_ms: float) -> tuple[str, str, int]:
    """(policy, worker, content chunks) of one streamed request, a token every `itl_ms`."""
    raw = await client.chat.completions.with_raw_response.create(
        model="auto", messages=MSG, stream=True, max_tokens=tokens, extra_body={"fake": {"itl_ms": itl_ms}})
    stream = raw.parse()
    assert isinstance(stream, openai.AsyncStream)
    chunks = sum([1 async for c in stream if c.choices and c.choices[0].delta.content])
    return raw.headers["x-turnout-policy"], raw.headers["x-turnout-model"], chunks


async def drive(url: str, config_file: Path, fakes: dict[str, Upstream], policies: list[str]
                ) -> tuple[list[Any], list[tuple[str, Any]], list[float]]:
    """200 long streams, then the reloads, each followed by 10 short streams run to the end before the next
    reload; every result or error, and the gateway's in-flight gauge after each reload."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    async with client, httpx.AsyncClient(base_url=url, timeout=30) as admin:
        # 200 long streams (40 tokens x 250 ms = 10 s or more each), started before the first reload.
        in_flight = [asyncio.create_task(stream_once(client, LONG_TOKENS, 250)) for _ in range(200)]
        await asyncio.sleep(1.0)
        short: list[tuple[str, Any]] = []
        gauge: list[float] = []
        for policy in policies:
            text = yaml.safe_dump(config_with_default(fakes, policy))
            await asyncio.to_thread(config_file.write_text, text)
            resp = await admin.post("/admin/reload", headers={"authorization": f"Bearer {KEY}"})
            assert resp.status_code == 200, resp.text
            gauge.append(await asyncio.to_thread(sample_sum, f"{url}/metrics", "turnout_in_flight_requests"))
            # Requests sent once the reload has answered must see the new default policy.
            got = await asyncio.gather(*(stream_once(client, 3, 10) for _ in range(10)), return_exceptions=True)
            short += [(policy, r) for r in got]
        long = await asyncio.gather(*in_flight, return_exceptions=True)
    return list(long), short, gauge


@pytest.mark.usefixtures("fake_reset")
def test_five_reloads_with_200_streams_in_flight(fakes: dict[str, Upstream], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_ADMIN_KEY", KEY)  # inherited by the gateway process
    proc, url = serve_gateway(config_with_default(fakes, "cheap"), tmp_path)
    config_file = next(tmp_path.glob("gateway-*.yaml"))
    policies = ["pricey", "cheap", "pricey", "cheap", "pricey"]
    expected_worker = {"cheap": "small", "pricey": "big"}
    with proc:
        long, short, gauge = asyncio.run(drive(url, config_file, fakes, policies))
    assert min(gauge) >= 200, gauge  # the long streams were in flight across every reload
    failures = [r for r in long + [r for _, r in short] if isinstance(r, BaseException)]
    assert failures == [], failures[:3]
    assert all(r[2] == LONG_TOKENS for r in long)  # every stream complete
    assert {r[0] for r in long} == {"cheap"}  # they kept the config they began on
    for policy, result in short:
        assert result[0] == policy and result[1] == expected_worker[policy]
    assert "Traceback" not in next(tmp_path.glob("gateway-*.log")).read_text()
