"""The side-by-side benchmark's verdicts: what counts as sustaining a rate, and each engine's highest."""

from __future__ import annotations

from typing import Any

from loadtest.sidebyside import max_sustained, sustains


def summary(p99: float, errors: float = 0.0, offered: float = 100.0, achieved: float = 100.0) -> dict[str, Any]:
    return {"latency_ms": {"p50": p99 / 2, "p99": p99}, "error_rate": errors, "offered_rps": offered,
            "achieved_rps": achieved}


def test_sustaining_needs_few_errors_a_near_direct_p99_and_the_rate() -> None:
    direct = summary(60.0)
    assert sustains(summary(119.0), direct)
    assert not sustains(summary(121.0), direct), "p99 over 2x direct's"
    assert not sustains(summary(80.0, errors=0.01), direct), "1% errors"
    assert not sustains(summary(80.0, achieved=94.0), direct), "fell behind the offered rate"
    assert not sustains({**summary(80.0), "latency_ms": None}, direct), "nothing answered"


def test_highest_sustained_rate() -> None:
    results = [{"rate": 25.0, "engines": {"a": {"sustained": True}, "b": {"sustained": True}}},
               {"rate": 50.0, "engines": {"a": {"sustained": True}, "b": {"sustained": False}}},
               {"rate": 100.0, "engines": {"a": {"sustained": False}}}]
    assert max_sustained(results, "a") == 50.0 and max_sustained(results, "b") == 25.0
    assert max_sustained(results, "c") == 0.0
