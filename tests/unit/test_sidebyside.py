"""The side-by-side benchmark's verdicts: what counts as sustaining a rate, and each engine's highest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadtest.sidebyside import judge, max_sustained, sustains, tree_cpu_s, verdicts


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


def test_tree_cpu_counts_the_children(tmp_path: Path) -> None:
    # A parent that spends no CPU itself and a child that burns about 0.3 s of it, then both wait.
    marker = tmp_path / "burnt"
    child = (f"import pathlib, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
             f"pathlib.Path({str(marker)!r}).touch()\ntime.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys\n"
                               f"subprocess.run([sys.executable, '-c', {child!r}])"], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
        own = float(sum(int(f) for f in Path(f"/proc/{parent.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]))
        assert tree_cpu_s(parent.pid) - own / os.sysconf("SC_CLK_TCK") >= 0.25
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child too
        parent.wait()


def test_verdicts_compare_at_rates_both_sustain() -> None:
    def row(rate: float, ours: tuple[bool, float], theirs: tuple[bool, float], direct: bool = True) -> dict[str, Any]:
        return {"rate": rate, "engines": {
            "direct": {"sustained": direct},
            "turnout-routed": {"sustained": ours[0], "added_ms": {"p99": ours[1]}},
            "portkey": {"sustained": theirs[0], "added_ms": {"p99": theirs[1]}}}}

    met = verdicts([row(10, (True, 5.0), (True, 40.0)), row(25, (True, 9.0), (False, 60.0)),
                    row(50, (True, 20.0), (False, 90.0)), row(100, (False, 90.0), (False, 90.0))])
    assert met[0] == "- turnout-routed sustains 50/s (direct 100/s)."
    assert "(10/s): lower at 1 of 1: met; highest sustained rate 50/s against portkey's 10/s." in met[1]
    worse = verdicts([row(10, (True, 50.0), (True, 40.0)), row(25, (False, 9.0), (True, 60.0))])
    assert "lower at 0 of 1: NOT met" in worse[1] and "10/s against portkey's 25/s" in worse[1]
    assert "(none): lower at 0 of 0: NOT met" in verdicts([row(10, (False, 5.0), (False, 40.0))])[1]
    # The upstream saturates first: what the routed gateway sustains is only a floor.
    bound = verdicts([row(1, (True, 5.0), (True, 40.0)), row(2, (False, 9.0), (False, 60.0), direct=False)])
    assert bound[0].endswith("the upstream itself sustains no more, so this is a floor).")
    assert verdicts([{"rate": 1, "engines": {"direct": {"sustained": True}}}]) == []


def test_no_engine_sustains_a_rate_the_upstream_does_not() -> None:
    row: dict[str, Any] = {"rate": 1.0, "engines": {"direct": summary(30000.0, achieved=90.0),
                                                     "gw": summary(31000.0)}}
    judge(row)
    assert not row["engines"]["direct"]["sustained"] and not row["engines"]["gw"]["sustained"]
    assert row["engines"]["gw"]["added_ms"]["p99"] == 1000.0
    row = {"rate": 1.0, "engines": {"direct": summary(60.0), "gw": summary(70.0)}}
    judge(row)
    assert row["engines"]["gw"]["sustained"]
