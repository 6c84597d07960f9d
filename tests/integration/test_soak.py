"""A soak of 10,000 requests under random worker faults and crashes (see `loadtest.soak`): every request ends
in a success or a well-formed OpenAI error, the client's counts by status equal the gateway's
`turnout_requests_total` exactly, and the gateway's memory does not grow more than 10% from the first minute
to the last."""

from __future__ import annotations

from pathlib import Path

from loadtest.soak import run_soak


def test_soak_of_10000_requests_under_worker_faults(tmp_path: Path) -> None:
    result = run_soak(10_000, rate=80, tmp=tmp_path)
    assert result.malformed == [], result.malformed[:5]
    assert sum(result.client.values()) == 10_000
    assert result.client == result.gateway, "every request is counted once, under the status the client saw"
    assert result.in_flight_after == 0
    assert result.faults.get("crash", 0) >= 2 and len(result.faults) >= 4, "the chaos really happened"
    assert result.client["ok"] < 10_000, "some faults reached clients (as well-formed errors)"
    assert result.seconds >= 120, "a first and a last minute to compare"
    first, last = result.rss_minutes()
    assert last <= first * 1.10, f"RSS grew from {first:.1f} MiB to {last:.1f} MiB"
