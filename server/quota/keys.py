"""Client API keys: who may call, which policies and models, and with what limits.

Keys are kept only as SHA-256 hashes: the YAML holds a hash or the name of an environment variable with the
key, and the gateway hashes what a client presents. With `auth.enabled: false` (the default, for a private
deployment) every request is anonymous and unlimited.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from server.config import AuthConfig, ConfigError, KeyConfig
from server.errors import GatewayError

#: Keys made by `new_key` start with this, so a leaked one is easy to recognise in logs and scanners.
KEY_PREFIX = "tk-"


def hash_key(key: str) -> str:
    """The SHA-256 (hex) a key is stored and looked up by."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A known key: its name (used in metrics, logs and limit keys; never the key) and its rules."""

    name: str
    sha256: str
    config: KeyConfig

    def allows_policy(self, policy: str) -> bool:
        """Whether the key may use this routing policy."""
        return not self.config.policies or policy in self.config.policies

    def allows_model(self, *names: str) -> bool:
        """Whether the key may reach a worker or model known by any of `names` (a worker's name, its model's):
        always when it has no `models` list."""
        return not self.config.models or any(n in self.config.models for n in names)

    def allows_direct(self, *names: str) -> bool:
        """Whether the key may name a worker or model directly (no policy choosing). Restrictions compose: a
        key limited to some policies and no models may call no model directly."""
        if self.config.models:
            return self.allows_model(*names)
        return not self.config.policies


def unauthorized(message: str) -> GatewayError:
    """401 in OpenAI's shape."""
    return GatewayError(401, message, type="invalid_request_error", code="invalid_api_key",
                        headers={"www-authenticate": "Bearer"})


def forbidden(message: str, param: str) -> GatewayError:
    """403: the key is valid but may not do this."""
    return GatewayError(403, message, type="invalid_request_error", code="permission_denied", param=param)


class KeyBook:
    """The keys of a config, by hash."""

    def __init__(self, auth: AuthConfig, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = auth.enabled
        self.by_hash: dict[str, KeyRecord] = {}
        problems: list[str] = []
        for i, k in enumerate(auth.keys):
            if k.key_sha256 is not None:
                digest = k.key_sha256
            elif k.key_env and env.get(k.key_env):
                digest = hash_key(env[k.key_env])
            else:
                problems.append(f"auth.keys[{i}].key_env: the environment variable {k.key_env} is not set")
                continue
            self.by_hash[digest] = KeyRecord(k.name, digest, k)
        if problems:
            raise ConfigError(problems, "auth")

    def digest_of(self, authorization: str | None) -> str:
        """The SHA-256 of the key presented as `Authorization: Bearer <key>` (401 when there is none). Keys are
        looked up by this hash: a lookup's timing tells nothing about a stored key."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.")
        return hash_key(token.strip())


class GuessGuard:
    """Failed attempts at the admin key or the operations token, per client address, in a sliding window: past
    `limit` failures in `window_s`, every attempt from that address is refused until the window has room again,
    whatever it carries, so a secret cannot be guessed at speed (a secret that went out in a log or a shell history
    is the other risk; see docs/operations.md). Per address, so one client's guesses lock out that client, not the
    operators."""

    #: Addresses remembered at most; past it the oldest are forgotten (random sources must not grow this unbounded).
    MAX_SOURCES = 10_000

    def __init__(self, limit: int = 10, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: dict[str, deque[float]] = {}

    def wait_s(self, source: str = "") -> float:
        """Seconds until an attempt from `source` may be checked again (0: now)."""
        failures = self._failures.get(source)
        if failures is None:
            return 0.0
        now = self.clock()
        while failures and now - failures[0] >= self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[source]
            return 0.0
        if len(failures) < self.limit:
            return 0.0
        return self.window_s - (now - failures[0])

    def failed(self, source: str = "") -> None:
        """Note a failed attempt from `source`."""
        if source not in self._failures and len(self._failures) >= self.MAX_SOURCES:
            del self._failures[next(iter(self._failures))]
        self._failures.setdefault(source, deque()).append(self.clock())
