"""The configured state store, built from the config's `state` section and the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping

from server.config import ConfigError, StateConfig
from server.store.base import Store
from server.store.memory import MemoryStore
from server.store.redis_store import RedisStore


def make_store(cfg: StateConfig, environ: Mapping[str, str] | None = None, max_entries: int = 1_000_000) -> Store:
    """The configured state store: this process's memory (its feedback and affinity entries bounded by
    `max_entries`), or Redis at the URL in `cfg.url_env`."""
    if cfg.backend == "memory":
        return MemoryStore(max_entries=max_entries)
    url = (os.environ if environ is None else environ).get(cfg.url_env)
    if not url:
        raise ConfigError([f"state.url_env: the environment variable {cfg.url_env} (the Redis URL) is not set"])
    return RedisStore(url, timeout_s=cfg.timeout_ms / 1000)
