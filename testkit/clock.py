"""Limits count in calendar periods shared by every replica: per-minute windows aligned to the epoch, budgets per
UTC hour, day or month. A test that must see its requests in one period starts early enough in it that they
cannot straddle two."""

from __future__ import annotations

import time

MINUTE_S = 60.0
DAY_S = 86400.0  # POSIX time has no leap seconds: epoch-aligned days are UTC days


def fresh_period_wait_s(period_s: float = MINUTE_S, margin_s: float = 15.0) -> float:
    """Seconds to wait before `margin_s` or more of one period (a calendar minute by default) lie ahead: 0 when
    they already do."""
    left = period_s - time.time() % period_s
    return 0.0 if left >= margin_s else left + 0.5
