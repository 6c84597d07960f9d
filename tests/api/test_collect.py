"""`turnout collect`'s engine against two fake workers (real processes): every answer recorded and priced at the
worker's usage, resumable without repeating a call, a cap that is never passed, and bad input refused before
anything is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from server.config import parse_config
from server.fleet.caller import FleetCaller
from server.fleet.collect import CollectError, Collector, Tally, plan
from server.fleet.commands import CollectOptions, collect
from server.fleet.run import RunDir
from server.fleet.sources import SourceError, read_source
from tests.conftest import Upstream, fake_config

PROMPTS = ["What is two plus two?", "Name a colour of the sky.", "Say hello to the world in French please.",
           "Count to three.", "Which is larger, a cat or a mouse?"]
MAX_TOKENS = 7


def write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "task": "smalltalk"}) + "\n" for p in prompts))
    return path


def requests_seen(fakes: dict[str, Upstream]) -> dict[str, int]:
    return {m: int(httpx.get(f"{up.root}/fake/stats", timeout=5).json()["requests"]) for m, up in fakes.items()}


def options(tmp_path: Path, **kw: Any) -> CollectOptions:
    base: dict[str, Any] = {"source": str(write_prompts(tmp_path / "prompts.jsonl")), "out": tmp_path / "run",
                            "max_tokens": MAX_TOKENS, "concurrency": 3}
    return CollectOptions(**{**base, **kw})


QUIET = Console(quiet=True)


@pytest.mark.usefixtures("fake_reset")
async def test_every_answer_is_recorded_and_priced_at_the_workers_usage(fakes: dict[str, Upstream],
                                                                        tmp_path: Path) -> None:
    cfg = parse_config(fake_config(fakes))
    tally = await collect(cfg, options(tmp_path), QUIET)
    assert (tally.done, tally.failed, tally.planned) == (10, 0, 10)
    answers = list(RunDir(tmp_path / "run").answers())
    assert len(answers) == 10 and all(a.ok for a in answers)
    prices = {w.model: w.price for w in cfg.workers}
    for a in answers:
        assert a.prompt_tokens is not None and a.completion_tokens == MAX_TOKENS
        assert a.cost_usd == prices[a.model].cost_usd(a.prompt_tokens, a.completion_tokens), "usage x the price"
        assert a.text and a.finish_reason and a.latency_s is not None and a.ttft_s is not None
        assert a.worker in ("small", "big")
    assert requests_seen(fakes) == {"fake-small": 5, "fake-big": 5}
    # The fake counts prompt tokens as words + 1: the run's tokens are the workers' own.
    words = sum(len(p.split()) + 1 for p in PROMPTS)
    assert sum(a.prompt_tokens or 0 for a in answers if a.model == "fake-big") == words
    assert tally.spent_usd == pytest.approx(sum(a.cost_usd or 0.0 for a in answers), rel=1e-12)


@pytest.mark.usefixtures("fake_reset")
async def test_a_rerun_sends_nothing_and_a_model_added_later_only_its_calls(fakes: dict[str, Upstream],
                                                                          tmp_path: Path) -> None:
    cfg = parse_config(fake_config(fakes))
    await collect(cfg, options(tmp_path, models=["fake-small"]), QUIET)
    assert requests_seen(fakes) == {"fake-small": 5, "fake-big": 0}
    again = await collect(cfg, options(tmp_path, models=["fake-small"]), QUIET)
    assert again.planned == 0 and requests_seen(fakes) == {"fake-small": 5, "fake-big": 0}
    both = await collect(cfg, options(tmp_path), QUIET)
    assert both.planned == 5 and requests_seen(fakes) == {"fake-small": 5, "fake-big": 5}
    with pytest.raises(CollectError, match="other settings"):
        await collect(cfg, options(tmp_path, max_tokens=MAX_TOKENS + 1), QUIET)


@pytest.mark.usefixtures("fake_reset")
async def test_a_stop_lets_calls_in_flight_finish_and_the_rerun_repeats_none(fakes: dict[str, Upstream],
                                                                            tmp_path: Path) -> None:
    """What Ctrl-C does (`commands._run` sets the same event on SIGINT): stop sending, record what is in flight."""
    cfg = parse_config(fake_config(fakes))
    opts = options(tmp_path)
    run = RunDir(opts.out)
    prompts = read_source(opts.source)
    run.start({"source": opts.source, "sample": None, "seed": 0, "max_tokens": MAX_TOKENS, "temperature": 0.0},
              prompts)
    caller = FleetCaller(cfg)
    writer = run.appender()

    def stop_after_four(t: Tally) -> None:
        if t.done >= 4:
            collector.stop.set()

    collector = Collector(caller, writer, MAX_TOKENS, concurrency=3, on_answer=stop_after_four)
    prices = {m: caller.registry.resolve(m)[0].config.price for m in caller.registry.models()}
    tally = await collector.run(plan(prompts, caller.registry.models(), set(), prices, MAX_TOKENS))
    writer.close()
    await caller.aclose()
    assert tally.interrupted and 4 <= tally.done < 10
    recorded = len(list(run.answers()))
    assert sum(requests_seen(fakes).values()) == recorded == tally.done, "every call sent was recorded"
    rest = await collect(cfg, opts, QUIET)
    assert rest.done == 10 - recorded
    assert requests_seen(fakes) == {"fake-small": 5, "fake-big": 5}, "no call repeated, none lost"


@pytest.mark.usefixtures("fake_reset")
async def test_a_cap_below_the_estimate_sends_nothing_and_writes_nothing(fakes: dict[str, Upstream],
                                                                        tmp_path: Path) -> None:
    cfg = parse_config(fake_config(fakes))
    with pytest.raises(CollectError, match="nothing was sent"):
        await collect(cfg, options(tmp_path, max_cost_usd=1e-9), QUIET)
    assert not (tmp_path / "run").exists() and sum(requests_seen(fakes).values()) == 0


@pytest.mark.usefixtures("fake_reset")
async def test_a_partial_cap_stops_before_the_call_that_might_pass_it(fakes: dict[str, Upstream],
                                                                     tmp_path: Path) -> None:
    cfg = parse_config(fake_config(fakes))
    caller = FleetCaller(cfg)
    prompts = read_source(str(write_prompts(tmp_path / "p.jsonl")))
    prices = {m: caller.registry.resolve(m)[0].config.price for m in caller.registry.models()}
    jobs = plan(prompts, caller.registry.models(), set(), prices, MAX_TOKENS)
    await caller.aclose()
    cap = sum(j.estimate_usd for j in jobs) / 2
    tally = await collect(cfg, options(tmp_path, max_cost_usd=cap, partial=True, concurrency=1), QUIET)
    assert tally.stopped_by_cap and 0 < tally.done < 10
    assert tally.spent_usd <= cap
    assert tally.spent_usd + jobs[tally.done].worst_usd > cap, "it stopped only where the next call might pass it"
    assert sum(requests_seen(fakes).values()) == tally.done
    rest = await collect(cfg, options(tmp_path), QUIET)
    assert rest.done == 10 - tally.done and sum(requests_seen(fakes).values()) == 10


@pytest.mark.usefixtures("fake_reset")
async def test_an_unreachable_worker_is_recorded_per_call_and_the_run_goes_on(fakes: dict[str, Upstream],
                                                                             tmp_path: Path) -> None:
    raw = fake_config(fakes)
    raw["workers"].append({"name": "gone", "model": "gone-model", "base_url": "http://127.0.0.1:9/v1"})
    cfg = parse_config({**raw, "reliability": {"retries": 0}})
    tally = await collect(cfg, options(tmp_path), QUIET)
    latest = RunDir(tmp_path / "run").latest()
    gone = [a for (_, m), a in latest.items() if m == "gone-model"]
    assert len(gone) == 5 and all(a.error and not a.ok and a.cost_usd is None for a in gone)
    assert tally.failed == 5 and tally.done == 15
    assert all(a.ok for (_, m), a in latest.items() if m != "gone-model")


@pytest.mark.usefixtures("fake_reset")
async def test_bad_input_is_refused_before_anything_is_written(fakes: dict[str, Upstream], tmp_path: Path) -> None:
    cfg = parse_config(fake_config(fakes))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"question": "no prompt field"}) + "\n")
    with pytest.raises(SourceError, match="no `prompt` text or `messages` list"):
        await collect(cfg, options(tmp_path, source=str(empty)), QUIET)
    with pytest.raises(CollectError, match=r"unknown models \['nope'\]"):
        await collect(cfg, options(tmp_path, models=["nope"]), QUIET)
    with pytest.raises(SourceError, match="no such file"):
        await collect(cfg, options(tmp_path, source=str(tmp_path / "missing.csv")), QUIET)
    assert not (tmp_path / "run").exists() and sum(requests_seen(fakes).values()) == 0
