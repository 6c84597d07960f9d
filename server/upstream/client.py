"""The one pooled HTTP client to every worker."""

from __future__ import annotations

import httpx

from server.config import UpstreamConfig


def make_client(cfg: UpstreamConfig) -> httpx.AsyncClient:
    """The one pooled HTTP client to all workers, with explicit timeouts and limits."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            # Each request sets its worker's own connect timeout; reads are bounded by the request's TTFT, idle and
            # total timeouts (`server.upstream.resilience.EffectiveTimeouts`), the read timeout here is only a backstop.
            connect=cfg.connect_timeout_s, read=cfg.total_timeout_s,
            write=cfg.write_timeout_s, pool=cfg.pool_timeout_s,
        ),
        limits=httpx.Limits(
            max_connections=cfg.max_connections,
            max_keepalive_connections=cfg.max_keepalive_connections,
            keepalive_expiry=cfg.keepalive_expiry_s,
        ),
        # The gateway talks to its own workers; proxies from the environment must not intercept that.
        trust_env=False,
    )
