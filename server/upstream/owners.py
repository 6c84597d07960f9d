"""Which worker made which Responses API response. vLLM keeps a response in its own memory, so a follow-up
naming it (`previous_response_id`), its retrieval and its cancellation must reach that worker and no other. The
owner is kept in the shared store, so whichever replica of the gateway serves the follow-up finds it; with the
key that made it, so no other key can read or continue it."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from server.store.guard import StoreGuard

PREFIX = "turnout:response:"


@dataclass(frozen=True, slots=True)
class Owner:
    """The worker holding a response, the client key that made it (None with auth off), and its tokens so far
    (the prompt a follow-up carries along)."""

    worker: str
    key: str | None
    tokens: int


class ResponseOwners:
    """response id -> `Owner`, expiring `ttl_s` after it was made."""

    def __init__(self, guard: StoreGuard) -> None:
        self.guard = guard

    async def put(self, response_id: str, owner: Owner, ttl_s: float) -> None:
        """Remember `owner` for `response_id`."""
        key = PREFIX + response_id
        value = orjson.dumps({"worker": owner.worker, "key": owner.key, "tokens": owner.tokens})
        await self.guard.run("response_owner_put", lambda s: s.put(key, value, ttl_s))

    async def get(self, response_id: str) -> Owner | None:
        """The owner of `response_id`, or None when it is unknown (never made here, or expired)."""
        key = PREFIX + response_id
        raw, _ = await self.guard.run("response_owner_get", lambda s: s.get(key))
        if raw is None:
            return None
        data = orjson.loads(raw)
        return Owner(str(data["worker"]), data.get("key"), int(data.get("tokens") or 0))
