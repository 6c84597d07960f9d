"""`POST /v1/responses` through the gateway with fake workers, through the official `openai` SDK: whole and streamed
answers priced from their usage, routing by policy, and the stored responses that live in one worker's memory
(a follow-up by `previous_response_id`, GET and cancel reach the worker that made it while two replicas serve the
model; other keys see nothing; a worker gone is a 404 or 409). A worker breaking off a stream ends it with the
API's own `error` event, counted as `stream_error`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from server.quota.keys import hash_key
from tests.api.test_fallback import sample
from tests.conftest import Upstream, fake_config, gateway_in_process, start_fake

SMALL_PRICE = (0.1, 0.2)  # fake_config's prices for `small`, USD per 1M tokens


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Upstream]]:
    """Two fake workers serving the same model, `fake-twin` (each keeps its own responses)."""
    tmp = tmp_path_factory.mktemp("twins")
    procs = [start_fake("fake-twin", tmp), start_fake("fake-twin", tmp)]
    with procs[0], procs[1]:
        yield [Upstream("fake-twin", f"http://127.0.0.1:{p.cmd[p.cmd.index('--port') + 1]}/v1", p) for p in procs]


def twin_config(fakes: dict[str, Upstream], twins: list[Upstream], **overrides: Any) -> dict[str, Any]:
    raw = fake_config(fakes, **overrides)
    raw["workers"] += [{"name": f"twin-{i}", "model": "fake-twin", "base_url": t.base_url} for i, t in enumerate(twins)]
    raw["policies"]["twins"] = {"type": "fixed", "worker": "fake-twin"}
    return raw


def cost(prompt: int, completion: int, price: tuple[float, float] = SMALL_PRICE) -> float:
    return (prompt * price[0] + completion * price[1]) / 1e6


async def test_a_response_whole_and_streamed_is_priced_from_its_usage(fakes: dict[str, Upstream],
                                                                      fake_reset: None) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        raw = await gw.client.responses.with_raw_response.create(model="auto", input="hello there",
                                                                 max_output_tokens=3)
        got = raw.parse()
        assert got.output_text == "tok tok tok " and got.usage is not None
        assert (got.usage.input_tokens, got.usage.output_tokens) == (3, 3)
        assert raw.headers["x-turnout-model"] == "small" and raw.headers["x-turnout-policy"] == "cheap"
        events = [e async for e in await gw.client.responses.create(
            model="auto", input=[{"role": "user", "content": [{"type": "input_text", "text": "four words of input"}]}],
            max_output_tokens=5, stream=True)]
        metrics = (await gw.http.get("/metrics")).text
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 5
    final = events[-1].response  # type: ignore[union-attr]
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (5, 5)
    assert sample(metrics, "turnout_prompt_tokens_total", {"model": "fake-small"}) == 3 + 5
    assert sample(metrics, "turnout_completion_tokens_total", {"model": "fake-small"}) == 3 + 5
    assert sample(metrics, "turnout_cost_usd_total", {"model": "fake-small", "policy": "cheap"}) == pytest.approx(
        cost(8, 8), rel=1e-9)
    assert sample(metrics, "turnout_requests_total", {"policy": "cheap", "model": "fake-small", "worker": "small",
                                                      "status": "ok"}) == 2


async def test_follow_ups_reach_the_worker_holding_the_conversation(fakes: dict[str, Upstream],
                                                                    twins: list[Upstream]) -> None:
    """Two replicas serve the model; each first turn may land on either, and every follow-up, streamed or not and
    whatever model it names, reaches the one that made the response it continues (the other answers 404)."""
    async with gateway_in_process(twin_config(fakes, twins)) as gw:
        made: dict[str, str] = {}
        for i in range(12):
            raw = await gw.client.responses.with_raw_response.create(model="fake-twin", input=f"turn one {i}",
                                                                     max_output_tokens=2)
            made[raw.parse().id] = raw.headers["x-turnout-model"]
        assert set(made.values()) == {"twin-0", "twin-1"}, "both replicas made some"
        for i, (rid, worker) in enumerate(made.items()):
            if i % 2:
                raw = await gw.client.responses.with_raw_response.create(
                    model="turnout/twins", input="and then?", previous_response_id=rid, max_output_tokens=2)
                follow = raw.parse()
                assert raw.headers["x-turnout-model"] == worker
                assert follow.usage is not None and follow.usage.input_tokens == 3 + 4 + 2  # 'and then?' + turn one
            else:
                events = [e async for e in await gw.client.responses.create(
                    model="fake-twin", input="and then?", previous_response_id=rid, max_output_tokens=2,
                    stream=True)]
                assert events[-1].type == "response.completed"
                follow_id = events[0].response.id  # type: ignore[union-attr]
                second = await gw.client.responses.with_raw_response.create(
                    model="fake-twin", input="more", previous_response_id=follow_id, max_output_tokens=1)
                assert second.headers["x-turnout-model"] == worker, "a streamed response is remembered too"
            got = await gw.client.responses.with_raw_response.retrieve(rid)
            assert got.parse().id == rid and got.headers["x-turnout-model"] == worker
        with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
            await gw.client.responses.cancel(next(iter(made)))  # the worker's own answer, relayed
        with pytest.raises(openai.NotFoundError) as unknown:
            await gw.client.responses.create(model="fake-twin", input="x", previous_response_id="resp_nope")
        assert unknown.value.code == "response_not_found"
        with pytest.raises(openai.NotFoundError):
            await gw.client.responses.retrieve("resp_nope")
        kept = await gw.client.responses.create(model="fake-twin", input="not kept", store=False,
                                                max_output_tokens=1)
        with pytest.raises(openai.NotFoundError):
            await gw.client.responses.retrieve(kept.id)


async def test_a_key_sees_only_its_own_responses(fakes: dict[str, Upstream], fake_reset: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURNOUT_TEST_OTHER_KEY", "tk-other")
    cfg = fake_config(fakes, server={"default_max_tokens": 4})
    cfg["auth"] = {"enabled": True, "keys": [{"name": "team", "key_sha256": hash_key("tk-team"), "budget_usd": 1.0},
                                             {"name": "other", "key_env": "TURNOUT_TEST_OTHER_KEY"}]}
    async with gateway_in_process(cfg) as gw:
        team = gw.client.with_options(api_key="tk-team", max_retries=0)
        other = gw.client.with_options(api_key="tk-other", max_retries=0)
        mine = await team.responses.create(model="small", input="secret plans")
        stats = (await asyncio.to_thread(httpx.get, f"{fakes['fake-small'].root}/fake/stats", timeout=5)).json()
        # A budget needs a bound: the gateway set the Responses API's own field (not chat's max_tokens).
        assert stats["last_body"]["max_output_tokens"] == 4 and "max_tokens" not in stats["last_body"]
        for call in (other.responses.retrieve(mine.id), other.responses.cancel(mine.id),
                     other.responses.create(model="small", input="x", previous_response_id=mine.id)):
            with pytest.raises(openai.NotFoundError):
                await call
        follow = await team.responses.create(model="small", input="go on", previous_response_id=mine.id,
                                             max_output_tokens=1)
        assert follow.usage is not None and follow.usage.input_tokens == 3 + 3 + 4


async def test_a_worker_gone_is_a_404_or_a_409(fakes: dict[str, Upstream], twins: list[Upstream],
                                               tmp_path: Path) -> None:
    """The worker removed from the config: 404 saying so; configured but unreachable: 409 (no other holds it)."""
    path = tmp_path / "turnout.yaml"
    cfg = twin_config(fakes, twins)
    path.write_text(yaml.safe_dump(cfg))
    spare = start_fake("fake-spare", tmp_path)
    with spare:
        port = spare.cmd[spare.cmd.index("--port") + 1]
        cfg["workers"].append({"name": "spare", "model": "fake-spare", "base_url": f"http://127.0.0.1:{port}/v1"})
        path.write_text(yaml.safe_dump(cfg))
        async with gateway_in_process(path) as gw:
            held = await gw.client.responses.create(model="fake-spare", input="hello", max_output_tokens=1)
            spare.kill()
            with pytest.raises(openai.ConflictError) as gone:
                await gw.client.responses.create(model="fake-spare", input="x", previous_response_id=held.id)
            assert gone.value.code == "response_worker_unavailable" and "spare" in gone.value.message
            with pytest.raises(openai.ConflictError):
                await gw.client.responses.retrieve(held.id)
            cfg["workers"].pop()
            path.write_text(yaml.safe_dump(cfg))
            await gw.app.state.gateway.reload()
            with pytest.raises(openai.NotFoundError, match="no longer configured"):
                await gw.client.responses.create(model="fake-twin", input="x", previous_response_id=held.id)


async def test_a_stream_broken_off_ends_with_the_apis_error_event(fakes: dict[str, Upstream],
                                                                  fake_reset: None) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        events = [e async for e in await gw.client.responses.create(
            model="small", input="hello", max_output_tokens=8, stream=True,
            extra_body={"fake": {"drop_after": 3, "itl_ms": 5}})]
        await asyncio.sleep(0.05)
        metrics = (await gw.http.get("/metrics")).text
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds.count("response.output_text.delta") == 3
    assert kinds[-1] == "error" and "response.completed" not in kinds
    assert events[-1].code == "upstream_stream_error"  # type: ignore[union-attr]
    assert events[-1].sequence_number == events[-2].sequence_number + 1
    assert sample(metrics, "turnout_requests_total", {"policy": "", "model": "fake-small", "worker": "small",
                                                      "status": "stream_error"}) == 1


async def test_bad_responses_requests_are_400s_naming_the_field(fakes: dict[str, Upstream]) -> None:
    async with gateway_in_process(fake_config(fakes)) as gw:
        for bad, field in (({"model": "auto"}, "input"), ({"model": "auto", "input": []}, "input"),
                           ({"model": "auto", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
                           ({"model": "auto", "input": "x", "background": True}, "background"),
                           ({"model": "auto", "messages": [{"role": "user", "content": "x"}]}, "messages")):
            r = await gw.http.post("/v1/responses", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        r = await gw.http.get("/v1/responses/resp_x", params={"stream": "true"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
