"""The state store shared by gateway replicas: the few operations limits, budgets, feedback, affinity and the
bandit need, each atomic. `server.store.memory.MemoryStore` keeps them in this process (the default: one
gateway, no setup); `server.store.redis_store.RedisStore` keeps them in Redis, where every operation that
reads then writes is one Lua script, so concurrent replicas can never both pass a check that only one of them should.

Operations:
- `window_add`: a fixed-window counter with a limit (requests or tokens per minute). Admits exactly `limit`
  per window across all replicas: the check and the increment are one step.
- `admit`: one request's whole admission in one step (the one round trip on its path): its windows, and a
  hold against a budget of `budget` per period for the dearest of its candidate worst-case costs that fits
  (spent + held + it <= budget). `settle` releases a hold (or part of one) and adds the actual cost. Spend
  can never pass the budget.
- `put` / `get` / `claim`: small values with a time to live (feedback context, affinity); `claim` sets a
  value only if absent (a second feedback score for one request is refused on every replica).
- `hset_blob` / `hgetall_blobs`: one binary value per field of a hash (each replica's cumulative bandit
  update under its own field; readers add them up).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class StoreUnavailable(Exception):
    """The store cannot be reached (Redis down, timed out). What to do is the caller's policy."""


@dataclass(frozen=True, slots=True)
class Budget:
    """A budget period's state."""

    spent: float
    held: float


@dataclass(frozen=True, slots=True)
class Hold:
    """A budget hold to make at admission: the first of `amounts` (dearest first) that fits is held."""

    key: str
    amounts: tuple[float, ...]
    budget: float
    ttl_s: float


@dataclass(frozen=True, slots=True)
class Admitted:
    """What `Store.admit` did. When `window` is set or `over_budget` is true, nothing was counted or held."""

    window: int | None = None  # the index of the first window that did not fit
    wait_s: float = 0.0  # seconds until that window ends
    over_budget: bool = False  # no amount fit what is left of the budget
    state: Budget = Budget(0.0, 0.0)  # the budget as it was before this request
    held: float = 0.0  # the amount held

    @property
    def ok(self) -> bool:
        """Whether the request was admitted."""
        return self.window is None and not self.over_budget


@runtime_checkable
class Store(Protocol):
    """Atomic shared-state operations (see the module docstring). Every method may raise `StoreUnavailable`."""

    name: str

    async def window_add(self, key: str, amount: float, limit: float, window_s: float) -> float | None:
        """Add `amount` to the current window's total if it stays <= `limit`: None. Else nothing is added
        and the seconds until the window ends are returned."""
        ...

    async def window_adjust(self, key: str, amount: float, window_s: float, at: float | None = None) -> None:
        """Add `amount` (negative allowed) without a check to the total of the window holding time `at` (default:
        now): a token correction belongs to the minute the tokens were counted in."""
        ...

    async def admit(self, windows: Sequence[tuple[str, float, float]], window_s: float,
                    hold: Hold | None) -> Admitted:
        """One request's admission in one step: every (key, amount, limit) window is counted and the first of
        `hold.amounts` that fits the budget is held, or (when a window or the budget does not fit) nothing is."""
        ...

    async def settle(self, key: str, held: float, actual: float, ttl_s: float) -> None:
        """Release a hold of `held` and add `actual` to the spend."""
        ...

    async def budget(self, key: str) -> Budget:
        """The period's spend and holds (zero when unknown)."""
        ...

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Set a value that expires after `ttl_s`."""
        ...

    async def get(self, key: str) -> bytes | None:
        """A value, or None when absent or expired."""
        ...

    async def claim(self, key: str, ttl_s: float) -> bool:
        """Set `key` if absent (True), or leave it (False)."""
        ...

    async def hset_blob(self, key: str, field: str, value: bytes, ttl_s: float) -> None:
        """Set one field of a hash, and the hash's expiry."""
        ...

    async def hgetall_blobs(self, key: str) -> dict[str, bytes]:
        """Every field of a hash."""
        ...

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the store answers."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def window_key(key: str, window_s: float, now: float) -> tuple[str, float]:
    """The key of the fixed window holding `now`, and the seconds left in it. Windows are aligned to the epoch,
    so every replica agrees on them without talking to each other."""
    index = math.floor(now / window_s)
    return f"{key}:{index}", (index + 1) * window_s - now
