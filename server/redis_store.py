"""`RedisStore`: the `Store` operations on Redis (redis-py asyncio, one connection pool per gateway).

Each operation that checks and then writes is one Lua script, which Redis runs atomically: two replicas can
never both see room for the last request of a window or the last dollar of a budget. Every call has a short
timeout, and any Redis error becomes `StoreUnavailable`, so a dead or hung Redis is the caller's decision
(fail open or closed), never a hung request.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from server.store import Budget, StoreUnavailable, window_key

T = TypeVar("T")

# KEYS[1] window key; ARGV amount, limit, ttl ms. Returns -1 when added, else the window's remaining ttl in ms.
_WINDOW_ADD = """
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if total + amount > limit then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then ttl = tonumber(ARGV[3]) end
  return ttl
end
redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return -1
"""

# KEYS window keys (then the budget hash, if any); ARGV n windows, has budget, then amount, limit, ttl ms per
# window. Returns {index of the first window that does not fit (0-based) or -1, its ttl ms, spent, held}.
_ADMIT = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local total = tonumber(redis.call('GET', KEYS[i]) or '0')
  if total + tonumber(ARGV[3 * i]) > tonumber(ARGV[3 * i + 1]) then
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then ttl = tonumber(ARGV[3 * i + 2]) end
    local spent, held = '0', '0'
    if ARGV[2] == '1' then
      spent = redis.call('HGET', KEYS[n + 1], 'spent') or '0'
      held = redis.call('HGET', KEYS[n + 1], 'held') or '0'
    end
    return {i - 1, ttl, spent, held}
  end
end
for i = 1, n do
  redis.call('INCRBYFLOAT', KEYS[i], ARGV[3 * i])
  redis.call('PEXPIRE', KEYS[i], ARGV[3 * i + 2])
end
local spent, held = '0', '0'
if ARGV[2] == '1' then
  spent = redis.call('HGET', KEYS[n + 1], 'spent') or '0'
  held = redis.call('HGET', KEYS[n + 1], 'held') or '0'
end
return {-1, 0, spent, held}
"""

# KEYS[1] budget hash {spent, held}; ARGV amount, budget, ttl ms. Returns 1 when held, 0 when it does not fit.
_RESERVE = """
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local held = tonumber(redis.call('HGET', KEYS[1], 'held') or '0')
if spent + held + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBYFLOAT', KEYS[1], 'held', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] budget hash; ARGV held, actual, ttl ms. A hold never goes below zero (a settle after expiry).
_SETTLE = """
local held = tonumber(redis.call('HGET', KEYS[1], 'held') or '0') - tonumber(ARGV[1])
if held < 0 then held = 0 end
redis.call('HSET', KEYS[1], 'held', tostring(held))
redis.call('HINCRBYFLOAT', KEYS[1], 'spent', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore:
    """The shared store on Redis at `url`. `timeout_s` bounds every call (connect included)."""

    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.5, max_connections: int = 64,
                 clock: Callable[[], float] = time.time) -> None:
        # A blocking pool: a burst of requests waits (at most `timeout_s`) for a free connection instead of
        # failing at once when all `max_connections` are busy.
        # After Redis restarts, every pooled connection is dead. A connection idle for more than a second is
        # checked with a PING before use, so a restart after a quiet spell costs nothing. Failed commands are
        # never retried: the scripts are not idempotent, and a reserve or settle run twice would be wrong.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, health_check_interval=1)
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), retries=0))
        self.clock = clock
        self._window_add = self.client.register_script(_WINDOW_ADD)
        self._reserve = self.client.register_script(_RESERVE)
        self._settle = self.client.register_script(_SETTLE)
        self._admit = self.client.register_script(_ADMIT)

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (RedisError, OSError) as exc:  # OSError: a socket error redis-py did not wrap
            raise StoreUnavailable(f"redis {what}: {type(exc).__name__}: {exc}") from None

    async def window_add(self, key: str, amount: float, limit: float, window_s: float) -> float | None:
        """See `Store.window_add`."""
        wkey, left = window_key(key, window_s, self.clock())
        got: Any = await self._call("window_add", lambda: self._window_add(
            keys=[wkey], args=[repr(amount), repr(limit), _ms(left + 1)]))
        return None if int(got) < 0 else int(got) / 1000

    async def window_adjust(self, key: str, amount: float, window_s: float, at: float | None = None) -> None:
        """See `Store.window_adjust`."""
        now = self.clock()
        wkey, left = window_key(key, window_s, now if at is None else at)
        left -= now - (now if at is None else at)  # the window's time left from now
        if left + 1 <= 0:
            return  # that window is over (and expired): nothing left to correct

        async def op() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.incrbyfloat(wkey, amount)
                pipe.pexpire(wkey, _ms(left + 1))
                await pipe.execute()

        await self._call("window_adjust", op)

    async def admit(self, windows: Sequence[tuple[str, float, float]], window_s: float,
                    budget_key: str | None) -> tuple[int | None, float, Budget]:
        """See `Store.admit`."""
        now = self.clock()
        keys: list[str] = []
        args: list[Any] = [len(windows), 1 if budget_key else 0]
        for key, amount, limit in windows:
            wkey, left = window_key(key, window_s, now)
            keys.append(wkey)
            args += [repr(amount), repr(limit), _ms(left + 1)]
        if budget_key:
            keys.append(budget_key)
        got: Any = await self._call("admit", lambda: self._admit(keys=keys, args=args))
        failed, ttl_ms = int(got[0]), int(got[1])
        state = Budget(float(got[2]), float(got[3]))
        return (None, 0.0, state) if failed < 0 else (failed, ttl_ms / 1000, state)

    async def reserve(self, key: str, amount: float, budget: float, ttl_s: float) -> bool:
        """See `Store.reserve`."""
        got: Any = await self._call("reserve", lambda: self._reserve(
            keys=[key], args=[repr(amount), repr(budget), _ms(ttl_s)]))
        return int(got) == 1

    async def settle(self, key: str, held: float, actual: float, ttl_s: float) -> None:
        """See `Store.settle`."""
        await self._call("settle", lambda: self._settle(keys=[key], args=[repr(held), repr(actual), _ms(ttl_s)]))

    async def budget(self, key: str) -> Budget:
        """See `Store.budget`."""
        raw: Any = await self._call("budget", lambda: self.client.hgetall(key))
        return Budget(float(raw.get(b"spent", 0.0)), float(raw.get(b"held", 0.0)))

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """See `Store.put`."""
        await self._call("put", lambda: self.client.set(key, value, px=_ms(ttl_s)))

    async def get(self, key: str) -> bytes | None:
        """See `Store.get`."""
        got: Any = await self._call("get", lambda: self.client.get(key))
        return bytes(got) if got is not None else None

    async def claim(self, key: str, ttl_s: float) -> bool:
        """See `Store.claim`."""
        got: Any = await self._call("claim", lambda: self.client.set(key, b"1", px=_ms(ttl_s), nx=True))
        return bool(got)

    async def hset_blob(self, key: str, field: str, value: bytes, ttl_s: float) -> None:
        """See `Store.hset_blob`."""
        async def op() -> None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hset(key, field, value)
                pipe.pexpire(key, _ms(ttl_s))
                await pipe.execute()

        await self._call("hset_blob", op)

    async def hgetall_blobs(self, key: str) -> dict[str, bytes]:
        """See `Store.hgetall_blobs`."""
        raw: Any = await self._call("hgetall", lambda: self.client.hgetall(key))
        return {k.decode(): bytes(v) for k, v in raw.items()}

    async def ping(self) -> None:
        """See `Store.ping`."""
        await self._call("ping", lambda: self.client.ping())

    async def aclose(self) -> None:
        """Close the pool."""
        await self.client.aclose()
        await self.client.connection_pool.disconnect()
