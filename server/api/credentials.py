"""The operator's credentials: the admin key (`/admin/*`) and, with client keys on, the operations token that
`/metrics` and the status page's numbers need (their labels and figures name keys, models and costs).

Both are read from the environment at each request, so a rotation needs no reload. Each must be at least
`MIN_SECRET_CHARS` long (a shorter one leaves its endpoints off, saying why), and a client's failed attempts at
either are limited together (`GuessGuard`: past 10 a minute from one address, every attempt from it is a 429 until
the minute has room again).
"""

from __future__ import annotations

import hmac
import math
import os

from fastapi import Request

from server.errors import GatewayError
from server.gateway import GatewayState

#: The shortest admin key or operations token accepted: shorter ones can be guessed.
MIN_SECRET_CHARS = 32
_HOW = "for instance `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"


def _presented(request: Request, header: str) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get(header, "")


def _secret(env: str) -> str | None:
    """The secret in `env` when it is long enough; None otherwise."""
    value = os.environ.get(env)
    return value if value and len(value) >= MIN_SECRET_CHARS else None


def _checked(request: Request, gw: GatewayState, secrets: list[str], header: str, what: str,
             code: str) -> GatewayError | None:
    """429 while this client's failed attempts are over their limit; 401 unless the request presents one of
    `secrets`. A request presenting nothing is no guess: it is not counted (an open status page polling without
    its token must not lock anyone out)."""
    source = request.client.host if request.client is not None else ""
    wait = gw.admin_guesses.wait_s(source)
    if wait > 0:
        return GatewayError(429, f"Too many failed {what} attempts: every attempt is refused for a while.",
                            type="rate_limit_exceeded", code="too_many_admin_failures",
                            headers={"retry-after": str(max(1, math.ceil(wait)))})
    given = _presented(request, header).encode()
    if not given or not any(hmac.compare_digest(given, s.encode()) for s in secrets):
        if given:
            gw.admin_guesses.failed(source)
        return GatewayError(401, f"Missing or wrong {what} (Authorization: Bearer <key>).",
                            type="authentication_error", code=code)
    return None


def admin_key_problem(request: Request, gw: GatewayState) -> GatewayError | None:
    """Why `request` may not use the admin endpoints (None: it may): the admin key is the value of the
    environment variable `server.admin_key_env`."""
    env = gw.config.server.admin_key_env
    expected = os.environ.get(env)
    if not expected:
        return GatewayError(403, f"Admin endpoints are disabled: set {env} in the gateway's environment.",
                            type="permission_error", code="admin_disabled")
    if len(expected) < MIN_SECRET_CHARS:
        return GatewayError(403, f"Admin endpoints are disabled: the key in {env} is {len(expected)} characters "
                                 f"long; at least {MIN_SECRET_CHARS} are needed ({_HOW}).",
                            type="permission_error", code="admin_disabled")
    return _checked(request, gw, [expected], "x-turnout-admin-key", "admin key", "invalid_admin_key")


def ops_problem(request: Request, gw: GatewayState) -> GatewayError | None:
    """Why `request` may not read `/metrics` or `/ui/status.json` (None: it may). Without client keys
    (`auth.enabled: false`) anyone may, as before; with them, the operations token (the environment variable
    `server.metrics_token_env`) or the admin key is needed."""
    if not gw.live.keys.enabled:
        return None
    srv = gw.config.server
    secrets = [s for s in (_secret(srv.metrics_token_env), _secret(srv.admin_key_env)) if s is not None]
    if not secrets:
        return GatewayError(403, f"With client keys on, metrics and status need a token: set {srv.metrics_token_env} "
                                 f"(at least {MIN_SECRET_CHARS} characters, {_HOW}) and send it as "
                                 "Authorization: Bearer <token>.", type="permission_error", code="metrics_disabled")
    return _checked(request, gw, secrets, "x-turnout-metrics-token", "metrics token", "invalid_metrics_token")
