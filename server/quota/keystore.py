"""Client keys kept in the shared store (beside those in the YAML): added, listed and revoked at run time by
`turnout keys ...` or the admin endpoints, seen by every replica within `CACHE_S`.

A key is stored only as its SHA-256: `turnout:key:<sha256>` holds its rules (a `KeyConfig` as JSON), and the
hash `turnout:keys` maps each name to its SHA-256, for listing and revoking by name.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import orjson

from server.config import KeyConfig
from server.quota.keys import KeyBook, KeyRecord, hash_key, new_key, unauthorized
from server.store.base import Store
from server.store.guard import StoreGuard, state_unavailable

KEY_PREFIX = "turnout:key:"
INDEX = "turnout:keys"
#: Stored keys are kept until revoked (the store wants an expiry; this one is far away).
FOREVER_S = 100 * 365 * 86400.0
#: How long a replica trusts what it last read about a presented key (so revocation takes at most this long).
CACHE_S = 5.0
_REVOKED = b"revoked"


async def add_key(store: Store, rules: KeyConfig) -> str:
    """Store a new random key with `rules` (its `name` must be new); returns the key, shown only this once."""
    existing = await store.hgetall_blobs(INDEX)
    if rules.name in existing and existing[rules.name] != _REVOKED:
        raise ValueError(f"a key named {rules.name!r} exists; revoke it first")
    key = new_key()
    digest = hash_key(key)
    record = rules.model_copy(update={"key_sha256": digest, "key_env": None})
    await store.put(KEY_PREFIX + digest, orjson.dumps(record.model_dump()), FOREVER_S)
    await store.hset_blob(INDEX, rules.name, digest.encode(), FOREVER_S)
    return key


async def list_keys(store: Store) -> list[KeyConfig]:
    """Every stored key that is not revoked, by name."""
    out = []
    for _, digest in sorted((await store.hgetall_blobs(INDEX)).items()):
        raw = await store.get(KEY_PREFIX + digest.decode()) if digest != _REVOKED else None
        if raw:
            out.append(KeyConfig.model_validate(orjson.loads(raw)))
    return out


async def revoke_key(store: Store, name: str) -> bool:
    """Revoke the stored key called `name`; False when there is none."""
    digest = (await store.hgetall_blobs(INDEX)).get(name)
    if digest is None or digest == _REVOKED:
        return False
    await store.put(KEY_PREFIX + digest.decode(), b"", 1e-3)  # gone at once (a put cannot delete)
    await store.hset_blob(INDEX, name, _REVOKED, FOREVER_S)
    return True


#: Anthropic's SDK sends the key in this header; OpenAI's sends `Authorization: Bearer <key>`.
API_KEY_HEADER = "x-api-key"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The credentials a request presents, as an `Authorization` value: that header, or else the key in
    `x-api-key` (Anthropic's way), taken as a bearer key."""
    authorization = headers.get("authorization")
    if authorization:
        return authorization
    api_key = headers.get(API_KEY_HEADER)
    return f"Bearer {api_key}" if api_key else None


async def authenticate(book: KeyBook, guard: StoreGuard, stored: StoredKeys,
                       authorization: str | None) -> KeyRecord | None:
    """The client's key: None when auth is off; from the YAML, else from the store; 401 when unknown. While the
    store is away a stored key cannot be told from a wrong one: 503 (YAML keys keep working)."""
    if not book.enabled:
        return None
    digest = book.digest_of(authorization)
    record = book.by_hash.get(digest)
    if record is None:
        hit, record = stored.cached(digest)
        if not hit:
            record, local = await guard.run("key_lookup", lambda s: stored.fetch(s, digest), critical=True)
            if local:
                raise state_unavailable()
            stored.remember(digest, record)
    if record is None:
        raise unauthorized("Incorrect API key provided.")
    return record


class StoredKeys:
    """Stored keys looked up by hash, each answer remembered for `CACHE_S`."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}

    def cached(self, digest: str) -> tuple[bool, KeyRecord | None]:
        """(True, the record or None) when a fresh answer is remembered; (False, None) otherwise."""
        hit = self._cache.get(digest)
        if hit is not None and time.monotonic() - hit[0] < CACHE_S:
            return True, hit[1]
        return False, None

    def remember(self, digest: str, record: KeyRecord | None) -> None:
        """Remember what the shared store said about this hash."""
        if len(self._cache) > 10_000:  # random bad keys must not grow this without bound
            self._cache.clear()
        self._cache[digest] = (time.monotonic(), record)

    @staticmethod
    async def fetch(store: Store, digest: str) -> KeyRecord | None:
        """The stored key with this SHA-256, or None."""
        raw = await store.get(KEY_PREFIX + digest)
        if not raw:
            return None
        rules = KeyConfig.model_validate(orjson.loads(raw))
        return KeyRecord(rules.name, digest, rules)
