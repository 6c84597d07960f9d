"""Session affinity: which model a conversation's first routed turn went to, kept for a while in the shared
store, so a conversation stays on its model whichever replica serves its next turn.

Entries expire `ttl_s` after their last use (each use refreshes them). Session ids come from clients: they
are hashed into the key, so their length and content never matter to the store.
"""

from __future__ import annotations

import hashlib

from server.store.guard import StoreGuard

PREFIX = "turnout:affinity:"


class AffinityStore:
    """(policy, session) -> target."""

    def __init__(self, guard: StoreGuard) -> None:
        self.guard = guard

    @staticmethod
    def _key(policy: str, session: str) -> str:
        return f"{PREFIX}{policy}:{hashlib.sha256(session.encode()).hexdigest()[:32]}"

    async def get(self, policy: str, session: str, ttl_s: float) -> str | None:
        """The target remembered for this session (refreshing its expiry), or None."""
        key = self._key(policy, session)
        raw, _ = await self.guard.run("affinity_get", lambda s: s.get(key))
        if raw is None:
            return None
        await self.guard.run("affinity_put", lambda s: s.put(key, raw, ttl_s))
        return raw.decode()

    async def put(self, policy: str, session: str, target: str, ttl_s: float) -> None:
        """Remember `target` for this session for `ttl_s`."""
        key, value = self._key(policy, session), target.encode()
        await self.guard.run("affinity_put", lambda s: s.put(key, value, ttl_s))
