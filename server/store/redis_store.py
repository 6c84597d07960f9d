"""`RedisStore`: the `Store` operations on Redis (redis-py asyncio, one connection pool per gateway).

Each operation that checks and then writes is one Lua script, which Redis runs atomically: two replicas can
never both see room for the last request of a window or the last dollar of a budget. Every call has a short
timeout, and any Redis error becomes `StoreUnavailable`, so a dead or hung Redis is the caller's decision
(fail open or closed), never a hung request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from server.store.base import Admitted, Budget, Hold, StoreUnavailable, window_key

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

# KEYS window keys, then the budget hash if there is a hold. ARGV n windows, m hold amounts (0: no hold), budget,
# budget ttl ms; then amount, limit, ttl ms per window; then the m amounts, dearest first. Returns {the index of
# the first window that does not fit (0-based), -1 when admitted, or -2 when no amount fits the budget; that
# window's ttl ms; spent and held before this request; the amount held}. Nothing is written unless admitted.
_ADMIT = """
local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local spent, held = '0', '0'
if m > 0 then
  spent = redis.call('HGET', KEYS[n + 1], 'spent') or '0'
  held = redis.call('HGET', KEYS[n + 1], 'held') or '0'
end
for i = 1, n do
  local base = 4 + 3 * (i - 1)
  local total = tonumber(redis.call('GET', KEYS[i]) or '0')
  if total + tonumber(ARGV[base + 1]) > tonumber(ARGV[base + 2]) then
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then ttl = tonumber(ARGV[base + 3]) end
    return {i - 1, ttl, spent, held, '0'}
  end
end
local hold = nil
for j = 1, m do
  local amount = ARGV[4 + 3 * n + j]
  if tonumber(spent) + tonumber(held) + tonumber(amount) <= tonumber(ARGV[3]) then
    hold = amount
    break
  end
end
if m > 0 and hold == nil then return {-2, 0, spent, held, '0'} end
for i = 1, n do
  local base = 4 + 3 * (i - 1)
  redis.call('INCRBYFLOAT', KEYS[i], ARGV[base + 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[base + 3])
end
if hold ~= nil then
  redis.call('HINCRBYFLOAT', KEYS[n + 1], 'held', hold)
  redis.call('PEXPIRE', KEYS[n + 1], ARGV[4])
end
return {-1, 0, spent, held, hold or '0'}
"""

# KEYS[1] window key; ARGV amount, ttl ms. A correction to a window's total, without a check.
_WINDOW_ADJUST = """
redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
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


class _WriteBehind:
    """Writes off the request's path (settles, token corrections, feedback records), sent together: every write
    queued before the next turn of the event loop goes out in one pipeline. Each write is one command, and its
    caller still awaits its own reply (or `StoreUnavailable`). Batching matters because each command costs the
    gateway a fixed slice of CPU in redis-py, whatever it does, and a request ending queues two or three."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._pending: list[tuple[Callable[[Any], Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.writes = self.batches = 0  # how well writes are batched, for tests and benchmarks

    async def submit(self, add: Callable[[Any], Any]) -> Any:
        """Queue one command (`add` puts it on a pipeline) and wait for its reply."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((add, fut))
        if len(self._pending) == 1:  # the first of a batch starts the flush, which runs after this turn
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self.writes, self.batches = self.writes + len(batch), self.batches + 1
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for add, _ in batch:
                    add(pipe)
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            replies = [exc] * len(batch)
        except BaseException as exc:  # cancelled (shutdown) or a bug: no caller may wait for ever
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StoreUnavailable(f"redis write not sent: {type(exc).__name__}"))
            raise
        for (_, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue  # its caller was cancelled
            if isinstance(reply, BaseException):
                fut.set_exception(StoreUnavailable(f"redis write: {type(reply).__name__}: {reply}"))
            else:
                fut.set_result(reply)


class RedisStore:
    """The shared store on Redis at `url`. `timeout_s` bounds every call (connect included)."""

    name = "redis"

    def __init__(self, url: str, *, timeout_s: float = 0.5, max_connections: int = 64,
                 clock: Callable[[], float] = time.time) -> None:
        # A blocking pool: a burst of requests waits (at most `timeout_s`) for a free connection instead of
        # failing at once when all `max_connections` are busy.
        # After Redis restarts, every pooled connection is dead. A connection idle for more than a second is
        # checked with a PING before use, so a restart after a quiet spell costs nothing. Failed commands are
        # never retried: the scripts are not idempotent, and an admit or settle run twice would be wrong.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s, health_check_interval=1)
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), retries=0))
        self.clock = clock
        self._window_add = self.client.register_script(_WINDOW_ADD)
        self._admit = self.client.register_script(_ADMIT)
        self.later = _WriteBehind(self.client)

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
        """See `Store.window_adjust`. Sent with the other writes of this turn (see `_WriteBehind`)."""
        now = self.clock()
        wkey, left = window_key(key, window_s, now if at is None else at)
        left -= now - (now if at is None else at)  # the window's time left from now
        if left + 1 <= 0:
            return  # that window is over (and expired): nothing left to correct
        # EVAL with the script's text, not EVALSHA: nothing to reload after a Redis restart (Redis caches the
        # compiled script by its hash either way).
        await self.later.submit(lambda p: p.eval(_WINDOW_ADJUST, 1, wkey, repr(amount), _ms(left + 1)))

    async def admit(self, windows: Sequence[tuple[str, float, float]], window_s: float,
                    hold: Hold | None) -> Admitted:
        """See `Store.admit`."""
        now = self.clock()
        keys: list[str] = []
        amounts = hold.amounts if hold else ()
        args: list[Any] = [len(windows), len(amounts), repr(hold.budget) if hold else 0,
                           _ms(hold.ttl_s) if hold else 0]
        for key, amount, limit in windows:
            wkey, left = window_key(key, window_s, now)
            keys.append(wkey)
            args += [repr(amount), repr(limit), _ms(left + 1)]
        if hold:
            keys.append(hold.key)
            args += [repr(a) for a in amounts]
        got: Any = await self._call("admit", lambda: self._admit(keys=keys, args=args))
        code, state = int(got[0]), Budget(float(got[2]), float(got[3]))
        if code >= 0:
            return Admitted(window=code, wait_s=int(got[1]) / 1000, state=state)
        if code == -2:
            return Admitted(over_budget=True, state=state)
        return Admitted(state=state, held=float(got[4]))

    async def settle(self, key: str, held: float, actual: float, ttl_s: float) -> None:
        """See `Store.settle`. Sent with the other writes of this turn (see `_WriteBehind`)."""
        await self.later.submit(lambda p: p.eval(_SETTLE, 1, key, repr(held), repr(actual), _ms(ttl_s)))

    async def budget(self, key: str) -> Budget:
        """See `Store.budget`."""
        raw: Any = await self._call("budget", lambda: self.client.hgetall(key))
        return Budget(float(raw.get(b"spent", 0.0)), float(raw.get(b"held", 0.0)))

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """See `Store.put`. Sent with the other writes of this turn (see `_WriteBehind`)."""
        await self.later.submit(lambda p: p.set(key, value, px=_ms(ttl_s)))

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
