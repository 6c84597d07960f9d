"""Cross-model fallback: when the model a policy chose fails before anything reached the client, the request
goes to the policy's next candidate by its own ranking (at most `server.max_fallbacks` of them)."""

from __future__ import annotations

import logging

from server.accounting import Exchange
from server.errors import GatewayError
from server.routing import Selection
from server.state import GatewayState
from server.workers import WorkerRegistry

log = logging.getLogger("turnout.fallback")

#: Failures before anything reached the client that send a request on: to the next candidate, or (see
#: `RETRY_CODES`) to the same model again. A busy or vanished worker counts too: the request never reached it.
FALLBACK_CODES = frozenset({"upstream_unreachable", "upstream_timeout", "upstream_error", "worker_overloaded",
                            "no_healthy_worker"})
#: A worker's own line (`max_concurrency`, `max_queue`) refused the request in the gateway: nothing was sent to it,
#: so it is no failed exchange with the worker and a send after it is no re-send.
QUEUE_REFUSED = "worker_overloaded"
#: The failures worth retrying on the same model (a worker that timed out or is at capacity would be so again).
RETRY_CODES = frozenset({"upstream_unreachable", "upstream_error"})


def fallback_targets(sel: Selection, registry: WorkerRegistry, max_fallbacks: int) -> list[str]:
    """The targets to try in order: the decision's choice, then (when a policy ranked candidates) the next
    ones by its own ranking that have a usable worker, at most `max_fallbacks` of them."""
    if sel.decision is None or sel.affinity:
        return [sel.target]
    rest = [name for name in sel.decision.fallbacks() if name != sel.target and registry.usable(name)]
    return [sel.target, *list(dict.fromkeys(rest))[:max_fallbacks]]


def note_fallback(gw: GatewayState, registry: WorkerRegistry, ex: Exchange, err: GatewayError, failed: str,
                  to: str) -> None:
    """Record that target `failed` failed before its first byte (`err`: its worker's failure, or no worker was
    left to try) and the request moves on to target `to`. The worker's own failure is counted where it
    happened (see `proxy._send`); `ex.worker` may name an earlier target's worker here."""
    from_model, to_model = registry.resolve(failed)[0].model, registry.resolve(to)[0].model
    if gw.metrics.enabled:
        gw.metrics.fallbacks.labels(ex.policy or "", from_model, to_model, err.status_label()).inc()
    ex.fallback_from.append(from_model)
    log.warning("request %s: %s failed before its first byte (%s); falling back to %s",
                ex.request_id, from_model, err.log_message(), to_model)
