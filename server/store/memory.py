"""`MemoryStore`: the state store in this process (the embedded default: one gateway, no setup)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from server.store.base import Admitted, Budget, Hold, window_key


def _compact(value: bytes) -> bytes:
    """A copy of `value` that owns only its bytes. orjson's output keeps the 4 KiB buffer it was written into
    (measured: 4,098 bytes held per 100-byte record), so a store of 100,000 feedback records held 400 MB."""
    return bytes(memoryview(value))


@dataclass(slots=True)
class _Entry:
    value: object
    expires: float = math.inf


@dataclass
class MemoryStore:
    """All state in this process: exact for one gateway, shared with no other."""

    clock: Callable[[], float] = time.time
    name: str = "memory"
    # Values (`put`, `claim`) beyond this many are dropped oldest first: feedback records and affinity must not
    # grow without bound in one process. Windows and budgets are never dropped (that would reset a limit).
    max_entries: int = 1_000_000
    _data: dict[str, _Entry] = field(default_factory=dict)
    _values: dict[str, None] = field(default_factory=dict)  # keys of put/claim values, oldest first
    _writes: int = 0

    def _live(self, key: str) -> _Entry | None:
        entry = self._data.get(key)
        if entry is not None and entry.expires <= self.clock():
            del self._data[key]
            return None
        return entry

    def _sweep(self) -> None:
        # Expired windows, holds and values would otherwise pile up; a sweep per few thousand writes is cheap.
        self._writes += 1
        if self._writes % 4096 == 0:
            now = self.clock()
            for k in [k for k, e in self._data.items() if e.expires <= now]:
                del self._data[k]
                self._values.pop(k, None)

    async def window_add(self, key: str, amount: float, limit: float, window_s: float) -> float | None:
        """See `Store.window_add`."""
        wkey, left = window_key(key, window_s, self.clock())
        entry = self._live(wkey)
        total = float(entry.value) if entry is not None else 0.0  # type: ignore[arg-type]
        if total + amount > limit:
            return left
        self._data[wkey] = _Entry(total + amount, self.clock() + left + 1)
        self._sweep()
        return None

    async def window_adjust(self, key: str, amount: float, window_s: float, at: float | None = None) -> None:
        """See `Store.window_adjust`."""
        now = self.clock()
        wkey, left = window_key(key, window_s, now if at is None else at)
        if left + 1 <= now - (now if at is None else at):
            return  # that window is over: nothing left to correct
        entry = self._live(wkey)
        total = float(entry.value) if entry is not None else 0.0  # type: ignore[arg-type]
        self._data[wkey] = _Entry(total + amount, (now if at is None else at) + left + 1)
        self._sweep()

    async def admit(self, windows: Sequence[tuple[str, float, float]], window_s: float,
                    hold: Hold | None) -> Admitted:
        """See `Store.admit`."""
        state = await self.budget(hold.key) if hold else Budget(0.0, 0.0)
        for i, (key, amount, limit) in enumerate(windows):
            wkey, left = window_key(key, window_s, self.clock())
            entry = self._live(wkey)
            if (float(entry.value) if entry is not None else 0.0) + amount > limit:  # type: ignore[arg-type]
                return Admitted(window=i, wait_s=left, state=state)
        held = 0.0
        if hold is not None:
            fit = next((a for a in hold.amounts if state.spent + state.held + a <= hold.budget), None)
            if fit is None:
                return Admitted(over_budget=True, state=state)
            held = fit
            self._data[hold.key] = _Entry(Budget(state.spent, state.held + fit), self.clock() + hold.ttl_s)
        for key, amount, _ in windows:
            await self.window_adjust(key, amount, window_s)
        return Admitted(state=state, held=held)

    async def settle(self, key: str, held: float, actual: float, ttl_s: float) -> None:
        """See `Store.settle`."""
        state = await self.budget(key)
        self._data[key] = _Entry(Budget(state.spent + actual, max(0.0, state.held - held)), self.clock() + ttl_s)

    async def budget(self, key: str) -> Budget:
        """See `Store.budget`."""
        entry = self._live(key)
        return entry.value if entry is not None and isinstance(entry.value, Budget) else Budget(0.0, 0.0)

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """See `Store.put`."""
        self._data[key] = _Entry(_compact(value), self.clock() + ttl_s)
        self._remember(key)
        self._sweep()

    def _remember(self, key: str) -> None:
        self._values.pop(key, None)
        self._values[key] = None
        while len(self._values) > self.max_entries:
            oldest = next(iter(self._values))
            del self._values[oldest]
            self._data.pop(oldest, None)

    async def get(self, key: str) -> bytes | None:
        """See `Store.get`."""
        entry = self._live(key)
        return entry.value if entry is not None and isinstance(entry.value, bytes) else None

    async def claim(self, key: str, ttl_s: float) -> bool:
        """See `Store.claim`."""
        if self._live(key) is not None:
            return False
        self._data[key] = _Entry(b"1", self.clock() + ttl_s)
        self._remember(key)
        return True

    async def hset_blob(self, key: str, field: str, value: bytes, ttl_s: float) -> None:
        """See `Store.hset_blob`."""
        entry = self._live(key)
        fields = dict(entry.value) if entry is not None and isinstance(entry.value, dict) else {}
        fields[field] = _compact(value)
        self._data[key] = _Entry(fields, self.clock() + ttl_s)

    async def hgetall_blobs(self, key: str) -> dict[str, bytes]:
        """See `Store.hgetall_blobs`."""
        entry = self._live(key)
        return dict(entry.value) if entry is not None and isinstance(entry.value, dict) else {}

    async def ping(self) -> None:
        """Always answers."""

    async def aclose(self) -> None:
        """Nothing to release."""
