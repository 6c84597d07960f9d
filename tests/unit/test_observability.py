"""Metrics priming and the live collector, and the status page's book-keeping, without a running gateway."""

from __future__ import annotations

import time

import pytest
from prometheus_client import generate_latest

from routers.base import CandidateScore, RoutingDecision
from server.config import parse_config
from server.outcome import Outcome
from server.policy.table import RoutingTable
from server.quota.keys import KeyBook
from server.snapshot import Live
from server.telemetry.metrics import Metrics
from server.telemetry.record import Exchange
from server.telemetry.recorder import Recorder
from server.telemetry.status import RECENT, StatusBook
from server.upstream.workers import Health, WorkerRegistry

CONFIG = {
    "workers": [
        {"name": "small", "model": "s", "base_url": "http://127.0.0.1:9/v1",
         "price": {"input_per_1m": 1.0, "output_per_1m": 1.0}},
        {"name": "big", "model": "b", "base_url": "http://127.0.0.1:9/v1",
         "price": {"input_per_1m": 10.0, "output_per_1m": 10.0}},
    ],
    "policies": {"cheap": {"type": "fixed", "worker": "small"}},
}


def live() -> Live:
    cfg = parse_config(CONFIG)
    return Live(cfg, RoutingTable(cfg), WorkerRegistry(cfg), generation=3, loaded_at=time.time(),
                keys=KeyBook(cfg.auth))


def exchange(model: str, policy: str, pt: int, ct: int, status: Outcome = Outcome.OK) -> Exchange:
    cfg = parse_config(CONFIG)
    ex = Exchange(request_id="r", endpoint="chat", policy=policy, model=model, worker=model, status=status)
    ex.reference_price = cfg.reference[1]
    ex.set_usage({"prompt_tokens": pt, "completion_tokens": ct}, cfg.workers[0 if model == "s" else 1].price)
    ex.decision = RoutingDecision(chosen=model, ranking=(CandidateScore(name=model, score=1.0),), reason="r",
                                  policy=policy)
    return ex


def test_series_are_primed_at_zero_and_workers_read_at_scrape_time() -> None:
    m, snap = Metrics(), live()
    m.prime(snap.config)
    m.watch(lambda: snap.reading())
    snap.registry.workers["small"].health = Health.UP
    snap.registry.workers["small"].waiting = 4.0
    text = generate_latest(m.registry).decode()
    assert 'turnout_cost_usd_total{model="b",policy="cheap"} 0.0' in text
    assert 'turnout_reference_cost_usd_total{model="s",policy=""} 0.0' in text
    assert 'turnout_worker_up{model="s",worker="small"} 1.0' in text
    assert 'turnout_worker_up{model="b",worker="big"} 0.0' in text
    assert 'turnout_worker_requests_waiting{model="s",worker="small"} 4.0' in text
    assert 'turnout_worker_requests_waiting{model="b"' not in text, "an unread queue is absent, not 0"


def test_savings_against_the_reference_model() -> None:
    m, book = Metrics(), StatusBook()
    rec = Recorder(m, book)
    rec.record(exchange("s", "cheap", 1000, 1000), time.perf_counter())  # costs 0.002, would cost 0.02 on b
    rec.record(exchange("b", "cheap", 1000, 0), time.perf_counter())  # the reference itself: no savings
    text = generate_latest(m.registry).decode()
    assert 'turnout_savings_usd{policy="cheap"} 0.018' in text
    snap = book.snapshot(live().reading())
    assert snap["reference_model"] == "b" and snap["savings_usd"] == pytest.approx(0.018)
    assert snap["savings_share"] == pytest.approx(0.018 / 0.03)
    assert snap["routing_mix"] == {"cheap": {"b": 1, "s": 1}}


def test_status_percentiles_over_a_bounded_window() -> None:
    book = StatusBook()
    for i in range(RECENT + 500):
        ex = exchange("s", "cheap", 1, 1)
        book.add(ex, latency_s=(i + 1) / 1000)
    book.add(exchange("s", "cheap", 1, 1, status=Outcome.UPSTREAM_ERROR), latency_s=99.0)
    model = book.snapshot(live().reading())["models"]["s"]
    assert model["requests"] == RECENT + 501 and model["errors"] == 1
    assert model["latency_ms"]["n"] == RECENT, "failures and old requests are not in the percentiles"
    assert model["latency_ms"]["p50"] == pytest.approx(1000.5, abs=0.1)  # the last 1,000: 501..1500 ms


def test_only_failures_of_the_worker_count_as_its_errors() -> None:
    """The worker refusing a request as the client's mistake, or the client leaving, is no upstream error (as on
    the status page, in the alert rules and for the breaker); a worker's own failure is."""
    m, book = Metrics(), StatusBook()
    rec = Recorder(m, book)
    for status in (Outcome.OK, Outcome.CLIENT_ERROR, Outcome.WORKER_CLIENT_ERROR, Outcome.CLIENT_DISCONNECT,
                   Outcome.UPSTREAM_TIMEOUT):
        rec.record(exchange("s", "cheap", 1, 1, status=status), time.perf_counter())
    text = generate_latest(m.registry).decode()
    errors = [line for line in text.splitlines() if line.startswith("turnout_upstream_errors_total{")]
    assert errors == ['turnout_upstream_errors_total{reason="upstream_timeout",worker="s"} 1.0']
    assert book.snapshot(live().reading())["models"]["s"]["errors"] == 1

