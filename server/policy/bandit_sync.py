"""Bandit learning shared by gateway replicas.

Each replica learns from the feedback it receives in memory, and every `state.sync_interval_s` it writes its
cumulative flushed updates (per bandit policy and artifact version) under its own field of one hash in the
store, reads every replica's field, and sets its policy's state to the artifact's warm start plus the sum of
them all (plus whatever it learned since). Writing whole cumulative sums rather than increments makes each
flush one idempotent write: a flush that fails is simply repeated with more in it next time, and nothing is
counted twice. While the store is away a replica keeps learning alone and catches up when it returns.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from routers.bandit import BanditRouter
from routers.base import Router
from server.store.guard import StoreGuard
from server.tasks import cancel_and_wait

log = logging.getLogger("turnout.bandit_sync")
F64 = npt.NDArray[np.float64]
#: Shared learning outlives restarts and quiet weeks, not forever.
TTL_S = 90 * 86400.0


def _pack(a: F64, b: F64, n: F64) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=a, b=b, n=n)
    return buf.getvalue()


def _unpack(blob: bytes) -> tuple[F64, F64, F64]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return z["a"], z["b"], z["n"]


class BanditSync:
    """Flushes and merges every bandit policy of the live config, in a background task."""

    def __init__(self, guard: StoreGuard, interval_s: float, routers: Callable[[], Mapping[str, Router]]) -> None:
        """`routers`: the live config's policies by name, read at every round (a reload replaces them)."""
        self.guard, self.interval_s, self.routers = guard, interval_s, routers
        # Unique per process: a restarted replica starts a new field, and its old one still counts.
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._totals: dict[str, tuple[F64, F64, F64]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start syncing (on the running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="turnout-bandit-sync")

    async def stop(self) -> None:
        """Stop, after one last flush of what was learned."""
        await cancel_and_wait(self._task)
        self._task = None
        await self.sync_once()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sync_once()
            except Exception:  # one bad round must not end sharing for good
                log.exception("bandit sync round failed")

    async def sync_once(self) -> None:
        """Flush each bandit policy's new updates and load the merged state of all replicas."""
        for name, router in self.routers().items():
            if isinstance(router, BanditRouter):
                await self._sync(name, router)

    async def _sync(self, name: str, router: BanditRouter) -> None:
        key = f"turnout:bandit:{name}:{router.version}"
        da, db, dn = router.bandit.pending_delta()
        total = self._totals.get(key)
        total = (da, db, dn) if total is None else (total[0] + da, total[1] + db, total[2] + dn)
        self._totals[key] = total
        if total[2].any():  # something learned here: share it (others' learning merges either way)
            blob = _pack(*total)
            _, local = await self.guard.run("bandit_flush", lambda s: s.hset_blob(key, self.replica, blob, TTL_S))
            if local:
                return  # the store is away: keep learning alone; the cumulative sums go out when it is back
        blobs, local = await self.guard.run("bandit_merge", lambda s: s.hgetall_blobs(key))
        if local or not blobs:
            return
        parts = [_unpack(b) for b in blobs.values()]
        a = np.sum([p[0] for p in parts], axis=0)
        b = np.sum([p[1] for p in parts], axis=0)
        n = np.sum([p[2] for p in parts], axis=0)
        router.bandit.merge(a, b, n)
