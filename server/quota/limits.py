"""Per-key rate limits and budgets on the shared store, and what happens when the store is away.

- Requests per minute and tokens per minute: fixed one-minute windows (aligned to the epoch, so every replica
  agrees on them). Tokens are counted at their worst case when the request is admitted (prompt upper bound +
  max_tokens, times n) and corrected to the actual usage when it ends.
- Budgets: when a request is admitted, the worst-case cost (those tokens at a model's prices) of the dearest
  model it may go to that still fits the budget is held; routing then keeps to models that fit the hold, and
  once the model and its fallbacks are known the excess is given back. When the request ends the hold is
  released and the actual cost spent. Holds and spend are checked and changed in one atomic step, so the sum
  of what was spent can never pass the budget, however many replicas admit requests at once.
- Store unreachable (see `server.store.guard`): `fail_open` serves on this replica's own memory store (limits then
  hold per replica rather than in total); `fail_closed` answers 503.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from prometheus_client import Counter

from server.errors import GatewayError, bad_request
from server.quota.keys import KeyRecord
from server.store.base import Hold, Store, StoreUnavailable
from server.store.guard import StoreGuard
from server.upstream.content import TEXT_PARTS

log = logging.getLogger("turnout.limits")
T = TypeVar("T")
WINDOW_S = 60.0
#: Settles of shared holds are retried with backoff (1, 2, 4... s, at most 30 s apart) this many times.
SETTLE_ATTEMPTS = 8
# A prompt's tokens are at most its bytes as JSON (each token of text covers at least one byte, and the JSON
# punctuation around each message outweighs the chat template's few tokens per message).


#: What one non-text content part (an image, audio) may cost in prompt tokens: its bytes say nothing about it.
MEDIA_PART_TOKENS = 16_384


# Everything of a body that becomes prompt tokens: completions' messages or prompt and what the chat template adds,
# an embedding's input, the sides of a rerank or score, a Responses request's instructions and output format (`text`),
# and Anthropic's system prompt.
_PROMPT_FIELDS = ("messages", "prompt", "tools", "functions", "response_format", "input", "query", "documents",
                  "text_1", "text_2", "data_1", "data_2", "queries", "items", "instructions", "system", "text")


def prompt_tokens_bound(body: dict[str, Any]) -> int:
    """An upper bound on the prompt's tokens: the bytes as JSON of everything the chat template renders into it
    (messages or prompt, tools, functions, response format; a Responses request's input, instructions and output
    format; Anthropic's system; an embedding's input; a rerank's or score's sides), plus
    `MEDIA_PART_TOKENS` per non-text part."""
    parts = {k: body[k] for k in _PROMPT_FIELDS if k in body}
    media = 0
    items = body.get("messages") or (body["input"] if isinstance(body.get("input"), list) else [])
    for msg in items:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            media += sum(1 for p in content if isinstance(p, dict) and p.get("type") not in (None, *TEXT_PARTS))
    try:
        size = len(orjson.dumps(parts))
    except orjson.JSONEncodeError as exc:  # nested deeper than the encoder writes: it could not be forwarded
        raise bad_request(f"Request body cannot be forwarded: {exc}") from None
    return size + media * MEDIA_PART_TOKENS


def period(kind: str, now: float) -> tuple[str, float]:
    """The id of the budget period (UTC calendar hour, day or month) holding `now`, and seconds to its end."""
    t = datetime.fromtimestamp(now, UTC)
    if kind == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        return start.strftime("%Y%m%d%H"), 3600 - (now - start.timestamp())
    if kind == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y%m%d"), 86400 - (now - start.timestamp())
    days = calendar.monthrange(t.year, t.month)[1]
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.strftime("%Y%m"), days * 86400 - (now - start.timestamp())


def too_many(message: str, retry_after_s: float, code: str, headers: dict[str, str] | None = None) -> GatewayError:
    """429 with `Retry-After` (whole seconds, at least 1), and any `x-ratelimit-*` headers."""
    return GatewayError(429, message, type="rate_limit_exceeded", code=code,
                        headers={"retry-after": str(max(1, math.ceil(retry_after_s))), **(headers or {})})


def ratelimit_headers(kind: str, limit: int, retry_after_s: float, remaining: int | None = None) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for one per-minute limit (`kind`: "requests" or "tokens"), which clients
    and SDKs read to pace themselves; `remaining` left out when it is not known."""
    out = {f"x-ratelimit-limit-{kind}": str(limit), f"x-ratelimit-reset-{kind}": f"{max(0.0, retry_after_s):.3f}s"}
    if remaining is not None:
        out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
    return out


@dataclass(slots=True)
class Admission:
    """What one request holds against its key's limits, to be settled when it ends."""

    key: KeyRecord
    tokens_held: int = 0
    budget_key: str | None = None
    usd_held: float = 0.0
    budget_ttl_s: float = 0.0
    remaining_usd: float | None = None  # the key's budget left when the request was admitted (before its hold)
    worst_usd: dict[str, float] = field(default_factory=dict)  # each candidate target's worst-case cost
    admitted_at: float = 0.0  # when its windows were counted: a token correction goes to that same minute
    local: bool = False  # counted and held on the replica's own store while the shared one was away


class Limits:
    """Checks and charges per-key limits on the shared store (through `guard`: fail open or closed)."""

    def __init__(self, guard: StoreGuard, limited: Counter, overruns: Counter | None = None) -> None:
        """`limited`: `turnout_limited_requests_total{key, limit}`, counted at every refusal; `overruns`:
        `turnout_hold_overruns_total{key}`, counted when a request spent more than its hold."""
        self.guard, self.limited, self.overruns = guard, limited, overruns

    def overrun(self, adm: Admission, spent_usd: float, request_id: str) -> None:
        """A request spent more than its hold: the worst case was wrong. It is charged what it spent (the settle
        does); this says so, in the metrics and the log."""
        if self.overruns is not None:
            self.overruns.labels(adm.key.name).inc()
        log.warning("request %s of key %s spent $%.9f, past its budget hold of $%.9f (charged in full)",
                    request_id, adm.key.name, spent_usd, adm.usd_held)

    async def _run(self, op: str, fn: Callable[[Store], Awaitable[T]], local: bool = False) -> tuple[T, bool]:
        return await self.guard.run(op, fn, critical=True, local=local)

    async def admit(self, key: KeyRecord, tokens: int, worst_usd: dict[str, float]) -> Admission:
        """Count one request and its worst-case tokens against the key's per-minute limits, and hold against
        its budget the dearest of `worst_usd` (each candidate target's worst-case cost) that fits: 429 when a
        limit is reached or not even the cheapest fits. One round trip to the store."""
        adm = Admission(key)
        c = key.config
        windows: list[tuple[str, float, float]] = []
        if c.requests_per_minute is not None:
            windows.append((f"turnout:rpm:{key.name}", 1, c.requests_per_minute))
        if c.tokens_per_minute is not None:
            windows.append((f"turnout:tpm:{key.name}", tokens, c.tokens_per_minute))
        hold: Hold | None = None
        if c.budget_usd is not None and worst_usd:
            budget_key, left = self._budget_key(key)
            ttl = left + 3600  # kept an hour past the period, for late settles and for inspection
            hold = Hold(budget_key, tuple(sorted(set(worst_usd.values()), reverse=True)), c.budget_usd, ttl)
        if not windows and hold is None:
            return adm
        adm.admitted_at = time.time()
        got, adm.local = await self._run("admit", lambda s: s.admit(windows, WINDOW_S, hold))
        if got.window is not None:
            if windows[got.window][0].startswith("turnout:rpm:"):
                self.limited.labels(key.name, "requests_per_minute").inc()
                raise too_many(f"Key '{key.name}' is over its limit of {c.requests_per_minute} requests per "
                               "minute.", got.wait_s, "rate_limit_exceeded",
                               ratelimit_headers("requests", int(c.requests_per_minute or 0), got.wait_s, 0))
            self.limited.labels(key.name, "tokens_per_minute").inc()
            raise too_many(f"Key '{key.name}' is over its limit of {c.tokens_per_minute} tokens per minute "
                           f"(this request may use up to {tokens}).", got.wait_s, "rate_limit_exceeded",
                           ratelimit_headers("tokens", int(c.tokens_per_minute or 0), got.wait_s))
        if hold is not None:
            left_usd = hold.budget - got.state.spent - got.state.held
            if got.over_budget:
                self.limited.labels(key.name, "budget").inc()
                raise too_many(f"Key '{key.name}' has not enough budget left this {c.budget_period} for this "
                               f"request (up to ${hold.amounts[-1]:.6f}; ${max(0.0, left_usd):.6f} left of "
                               f"${hold.budget:g}).", self._budget_key(key)[1], "budget_exceeded")
            adm.budget_key, adm.usd_held, adm.budget_ttl_s = hold.key, got.held, hold.ttl_s
            adm.remaining_usd = left_usd
        if c.tokens_per_minute is not None:
            adm.tokens_held = tokens
        return adm

    @staticmethod
    def _budget_key(key: KeyRecord) -> tuple[str, float]:
        """The store key of the key's current budget period, and the seconds left in the period."""
        pid, left = period(key.config.budget_period, time.time())
        return f"turnout:budget:{key.name}:{pid}", left

    async def release(self, adm: Admission, amount: float) -> None:
        """Give back `amount` of the request's hold (more than its targets can cost, once it is routed), on the
        store it was made on. Never raises."""
        if adm.budget_key is None or amount <= 0:
            return
        adm.usd_held -= amount
        key, ttl = adm.budget_key, adm.budget_ttl_s
        await self._on_same_store("release", adm.local, lambda s: s.settle(key, amount, 0.0, ttl))

    async def settle(self, adm: Admission, cost_usd: float | None, tokens: int | None) -> None:
        """Release the holds and charge what the request actually used, on the store each was made on. A hold
        made on the shared store is settled there, retried for a while if it is away (settling it on this
        replica's own store would leave the shared hold in place until the period ends). Never raises."""
        if adm.budget_key is not None:
            key, held, actual, ttl = adm.budget_key, adm.usd_held, cost_usd or 0.0, adm.budget_ttl_s
            await self._on_same_store("settle", adm.local, lambda s: s.settle(key, held, actual, ttl))
        if adm.tokens_held and tokens is not None and tokens != adm.tokens_held:
            delta, name, at = tokens - adm.tokens_held, f"turnout:tpm:{adm.key.name}", adm.admitted_at
            await self._on_same_store("window_adjust", adm.local,
                                      lambda s: s.window_adjust(name, delta, WINDOW_S, at=at))

    async def _on_same_store(self, op: str, local: bool, fn: Callable[[Store], Awaitable[None]]) -> None:
        if local:
            await fn(self.guard.local)
            return
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                await fn(self.guard.store)
                return
            except StoreUnavailable as exc:
                self.guard.signals.failed(op)
                log.warning("%s failed (%s); attempt %d of %d", op, exc, attempt + 1, SETTLE_ATTEMPTS)
                await asyncio.sleep(min(30.0, 2.0 ** attempt))
        log.error("%s gave up after %d attempts: the shared hold lapses with the budget period", op,
                  SETTLE_ATTEMPTS)
