"""Routed requests awaiting feedback, in the shared store: `POST /v1/feedback {request_id, score}` may reach
any replica, which finds the request's record (policy, chosen model, and for a bandit the features it was
routed on) and feeds the score to its own instance of the policy. A second score for one request is refused
on every replica (a claim in the store).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass

import numpy as np
import orjson

from routers.bandit import BanditRouter
from routers.base import Router, RoutingOutcome
from server.store.guard import StoreGuard

PREFIX = "turnout:feedback:"


@dataclass(slots=True)
class FeedbackRecord:
    """What feedback for one routed request needs."""

    policy: str
    version: str
    chosen: str
    features: list[float] | None = None  # a bandit's feature vector for this request
    arm: int | None = None
    cost_usd: float | None = None  # a bandit's: written again with the cost when the request ends
    key: str | None = None  # the client key that made the request: only it may score the answer


class FeedbackBook:
    """Records routed requests for `ttl_s` and hands scores to the policy that routed them."""

    def __init__(self, guard: StoreGuard, ttl_s: float, grace_s: float = 0.25) -> None:
        """`grace_s`: how long a score for an id not (yet) on record waits for its record. The record is written
        off the request's path (with other writes, see `redis_store._WriteBehind`), so a score sent to another
        replica the moment the answer arrived can get there first."""
        self.guard, self.ttl_s, self.grace_s = guard, ttl_s, grace_s

    @staticmethod
    def make_record(request_id: str, router: Router, policy: str, version: str, chosen: str,
                    key: str | None = None) -> FeedbackRecord:
        """A routed request's record (with the bandit's features when the policy learns from feedback), and the
        client key that made it (None with auth off)."""
        rec = FeedbackRecord(policy, version, chosen, key=key)
        if isinstance(router, BanditRouter) and (ctx := router.context(request_id)) is not None:
            rec.features, rec.arm = [float(v) for v in ctx[0]], ctx[1]
        return rec

    async def record(self, request_id: str, router: Router, policy: str, version: str, chosen: str) -> None:
        """Remember a routed request."""
        await self.put(request_id, self.make_record(request_id, router, policy, version, chosen))

    async def give(self, request_id: str, score: float, routers: dict[str, Router],
                   key: str | None = None) -> tuple[str, str | None]:
        """Feed `score` from client key `key` to the policy that routed `request_id` (this replica's instance in
        `routers`). Returns ("accepted", policy), ("duplicate", policy) for a second score (ignored), or
        ("unknown", None) for an id never routed, routed more than `ttl_s` ago, or routed for another key (to
        which it is as unknown: its score neither counts nor uses up the owner's)."""
        rec = await self._get(request_id)
        deadline = time.monotonic() + self.grace_s
        while rec is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            rec = await self._get(request_id)
        if rec is None or rec.key != key:
            return "unknown", None
        claimed, _ = await self.guard.run("claim", lambda s: s.claim(f"{PREFIX}{request_id}:scored", self.ttl_s))
        if not claimed:
            return "duplicate", rec.policy
        router = routers.get(rec.policy)
        # A reload may have replaced the policy's artifact since: then the features mean nothing to it.
        if router is not None and getattr(router, "version", None) == rec.version:
            if isinstance(router, BanditRouter) and rec.features is not None and rec.arm is not None:
                router.learn(np.asarray(rec.features), rec.arm, score, rec.cost_usd)
            else:
                # Without the cost: the policy heard it when the request ended (a pacing policy would count it twice).
                router.observe(RoutingOutcome(request_id=request_id, chosen=rec.chosen, ok=True, quality=score))
        return "accepted", rec.policy

    async def put(self, request_id: str, rec: FeedbackRecord) -> None:
        """Write (or rewrite) a request's record, for `ttl_s`."""
        blob = orjson.dumps(asdict(rec))
        await self.guard.run("put", lambda s: s.put(PREFIX + request_id, blob, self.ttl_s))

    async def _get(self, request_id: str) -> FeedbackRecord | None:
        raw, _ = await self.guard.run("get", lambda s: s.get(PREFIX + request_id))
        return FeedbackRecord(**orjson.loads(raw)) if raw is not None else None
