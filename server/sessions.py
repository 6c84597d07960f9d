"""Session affinity: which model a conversation's first routed turn went to, kept for a while.

In memory, per gateway process; bounded in entries and time. (Sharing it between replicas is the shared
state's job.)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class AffinityStore:
    """(policy, session) -> target, least recently used first out, each entry expiring `ttl_s` after last use."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, policy: str, session: str, ttl_s: float) -> str | None:
        """The target remembered for this session (refreshing it), or None if none or expired."""
        key = (policy, session)
        entry = self._entries.get(key)
        if entry is None:
            return None
        target, seen = entry
        now = self._clock()
        if now - seen > ttl_s:
            del self._entries[key]
            return None
        self._entries[key] = (target, now)
        self._entries.move_to_end(key)
        return target

    def put(self, policy: str, session: str, target: str, max_sessions: int) -> None:
        """Remember `target` for this session, evicting the least recently used beyond `max_sessions`."""
        key = (policy, session)
        self._entries[key] = (target, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > max_sessions:
            self._entries.popitem(last=False)
