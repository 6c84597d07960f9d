"""Per-minute limits count in calendar minutes (windows aligned to the epoch, shared by every replica), so a
test that must see N requests in one window starts early enough in a minute that they cannot straddle two."""

from __future__ import annotations

import time


def wait_for_a_fresh_minute_s(margin_s: float = 15.0) -> float:
    """Seconds to wait before `margin_s` or more of one calendar minute lie ahead: 0 when they already do."""
    left = 60.0 - time.time() % 60.0
    return 0.0 if left >= margin_s else left + 0.5
