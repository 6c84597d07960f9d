"""`StoreGuard`: every use of the shared store goes through it, so an unreachable store is handled one way.

On `StoreUnavailable` the store is not tried again for `RETRY_S` (during an outage requests do not each wait
for a timeout; once it is back, the first request after the interval finds out and the rest follow), the
failure is counted in `turnout_store_errors_total{op}` and `turnout_store_up` drops to 0. What the caller gets
meanwhile depends on the operation: state that limits requests (`critical=True`) follows `state.on_failure`
(this replica's own memory store for fail_open, 503 for fail_closed); everything else (feedback, affinity, the
bandit's sharing) always carries on with this replica's own state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, TypeVar

from server.errors import GatewayError
from server.store.base import Store, StoreUnavailable
from server.store.memory import MemoryStore

log = logging.getLogger("turnout.shared")
T = TypeVar("T")
RETRY_S = 1.0


class StoreSignals(Protocol):
    """Where the guard reports the store's reachability (the gateway's metrics: `turnout_store_up` and
    `turnout_store_errors_total`)."""

    def up(self, reachable: bool) -> None:
        """The last operation did (True) or did not (False) reach the store."""

    def failed(self, op: str) -> None:
        """Operation `op` could not use the store (served by local state, or refused)."""


class NoSignals:
    """`StoreSignals` that report nowhere (tools and tests without metrics)."""

    def up(self, reachable: bool) -> None:
        """Ignored."""

    def failed(self, op: str) -> None:
        """Ignored."""


def state_unavailable() -> GatewayError:
    """503: limits cannot be checked and the gateway is configured to refuse rather than guess."""
    return GatewayError(503, "Shared state (limits and budgets) is unavailable; retry shortly.",
                        type="server_error", code="state_unavailable", headers={"retry-after": "2"})


class StoreGuard:
    """The shared store, this replica's fallback memory store, and the policy between them."""

    def __init__(self, store: Store, on_failure: Literal["fail_open", "fail_closed"], signals: StoreSignals,
                 clock: Callable[[], float] = time.time, max_entries: int = 1_000_000) -> None:
        """`signals` hears whether the store answers and which operations failed to reach it."""
        self.store, self.on_failure, self.signals = store, on_failure, signals
        self.local = MemoryStore(clock=clock, max_entries=max_entries)
        self._down_until = 0.0

    @property
    def shared(self) -> bool:
        """Whether the shared store is believed reachable."""
        return self._down_until == 0.0

    async def run(self, op: str, fn: Callable[[Store], Awaitable[T]], *, critical: bool = False,
                  local: bool = False) -> tuple[T, bool]:
        """`fn` on the shared store, or on the local one when the store is away (or `local` is asked: a request
        that began on local state finishes there). Returns the result and whether the local store served it."""
        if not local:
            if time.monotonic() >= self._down_until:
                try:
                    result = await fn(self.store)
                    if self._down_until:
                        log.info("the state store answers again; state is shared once more")
                        self._down_until = 0.0
                    self.signals.up(True)
                    return result, False
                except StoreUnavailable as exc:
                    self._down_until = time.monotonic() + RETRY_S
                    self.signals.up(False)
                    log.warning("%s; state.on_failure is %s", exc, self.on_failure)
            self.signals.failed(op)
            if critical and self.on_failure == "fail_closed":
                raise state_unavailable()
        return await fn(self.local), True
