"""From a request to a target: which policy, which candidates, the decision, its shadow, session affinity,
and the fallbacks to try when the choice fails before its first byte.

The policies themselves and the resolution of a request's `model` field are `server.policy.table`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from routers.base import CandidateScore, Router, RoutingDecision, RoutingRequest
from server.errors import bad_request, no_worker_available
from server.policy.affinity import AffinityStore
from server.policy.embedding import EmbeddingService
from server.policy.options import RouteOptions
from server.policy.table import POLICY_HEADER, RoutingTable
from server.telemetry.tracing import child_span
from server.upstream.workers import WorkerRegistry

log = logging.getLogger("turnout.routing")

SESSION_HEADER = "x-session-id"
#: A policy reads at most this many characters of the prompt: its text statistics and the embedder's input are then
#: bounded work whatever a client sends (a megabyte's statistics alone cost 40 ms of CPU). Prompts of the routing
#: tables are shorter, so what a policy saw in training it sees live.
POLICY_TEXT_CHARS = 32_768
LOG_EVERY_S = 10.0
_last_logged: dict[str, float] = {}


@dataclass(frozen=True, slots=True)
class RouteInput:
    """What routing reads from a request (`text`: the prompt's first `POLICY_TEXT_CHARS` characters)."""

    model: str
    text: str
    options: RouteOptions | None = None
    header_policy: str | None = None
    session: str | None = None


@dataclass(frozen=True, slots=True)
class Selection:
    """Where a request goes: a target (worker or model name) and, when a policy chose it, how."""

    target: str
    policy: str | None = None
    decision: RoutingDecision | None = None
    router: Router | None = None
    shadow: RoutingDecision | None = None
    routing_s: float = 0.0  # embedding + scoring, as seen by this request
    embed_s: float | None = None  # waiting for the embedding (None: no policy needed one)
    embed_cached: bool | None = None
    score_s: float | None = None  # the policy's and its shadow's scoring
    affinity: bool = False
    embed_error: str | None = None  # the embedding failed: the policy's fallback was chosen without scoring


def explicit_policy(inp: RouteInput) -> str | None:
    """The policy named by the body's `turnout.policy` or the header; 400 if they disagree."""
    body = inp.options.policy if inp.options is not None else None
    header = inp.header_policy.strip() if inp.header_policy and inp.header_policy.strip() else None
    if body is not None and header is not None and body != header:
        raise bad_request(f"the '{POLICY_HEADER}' header ('{header}') and turnout.policy ('{body}') disagree.",
                          "turnout.policy")
    return body or header


def _candidates(router: Router, policy: str, options: RouteOptions | None, registry: WorkerRegistry) -> list[str]:
    targets = list(router.targets())
    if options is not None and options.candidates is not None:
        unknown = [c for c in options.candidates if c not in targets]
        if unknown:
            raise bad_request(f"turnout.candidates: {unknown} are not candidates of policy '{policy}' "
                              f"(its candidates: {targets}).", "turnout.candidates")
        targets = [t for t in targets if t in options.candidates]
    available = [t for t in targets if registry.usable(t)]
    if not available:  # panic mode: the policy chooses among them all, the registry the least recently failed
        available = [t for t in targets if registry.reachable(t)]
    if not available:
        raise no_worker_available(", ".join(targets))
    return available


def candidate_targets(table: RoutingTable, registry: WorkerRegistry, inp: RouteInput) -> list[str]:
    """The targets a request may go to before its policy decides: the policy's available candidates (or the
    one worker or model named directly)."""
    policy = table.policy_for(inp.model, explicit_policy(inp))
    if policy is None:
        return [inp.model]
    return _candidates(table.routers[policy], policy, inp.options, registry)


async def select(table: RoutingTable, registry: WorkerRegistry, embedding: EmbeddingService | None,
                 affinity: AffinityStore, inp: RouteInput, request_id: str, *, dry_run: bool = False) -> Selection:
    """Resolve the request's policy and ask it for a decision (and its shadow's).

    `dry_run` (`POST /v1/route`) decides without remembering anything for the session.
    """
    policy = table.policy_for(inp.model, explicit_policy(inp))
    if policy is None:
        return Selection(target=inp.model)
    started = time.perf_counter()
    router, spec = table.routers[policy], table.specs[policy]
    candidates = _candidates(router, policy, inp.options, registry)
    aff = spec.affinity if spec.affinity is not None and spec.affinity.enabled else None
    if aff is not None and inp.session:
        kept = await affinity.get(policy, inp.session, aff.ttl_s)
        if kept is not None and kept in candidates:
            decision = RoutingDecision(
                chosen=kept, ranking=(CandidateScore(name=kept, score=1.0),),
                reason=f"session affinity: this conversation started on {kept}", policy=policy,
                version=getattr(router, "version", "static") or "static")
            return Selection(target=kept, policy=policy, decision=decision, router=router, affinity=True,
                             routing_s=time.perf_counter() - started)
    shadow_router = table.routers.get(spec.shadow) if spec.shadow else None
    vector, embed_s, cached = None, None, None
    if router.needs_embedding or (shadow_router is not None and shadow_router.needs_embedding):
        if embedding is None:  # pragma: no cover - the state builds the service whenever a policy needs it
            raise RuntimeError("a policy needs embeddings but the gateway has no embedder")
        try:
            with child_span("turnout.embed", **{"turnout.policy": policy}) as span:
                got = await embedding.embed(inp.text)
                if span is not None:
                    span.set_attribute("turnout.embed_cached", got.cached)
        except Exception as exc:  # the embedder failed: the policy's fallback answers, never a 500
            return _undecided(router, policy, candidates, getattr(spec, "fallback", None), exc, started)
        vector, embed_s, cached = got.vector, got.wait_s, got.cached
    opts = inp.options
    req = RoutingRequest(
        request_id=request_id, text=inp.text, candidates=tuple(candidates), embedding=vector,
        max_cost_usd=opts.max_cost_usd if opts else None, min_quality=opts.min_quality if opts else None,
        queue={t: registry.queue(t) for t in candidates},
    )
    t_score = time.perf_counter()
    with child_span("turnout.score", **{"turnout.policy": policy, "turnout.candidates": list(candidates)}) as span:
        decision = router.route(req)
        shadow = None
        if shadow_router is not None:
            shadow = _shadow_decision(shadow_router, req, registry)
        if span is not None:
            span.set_attribute("turnout.chosen", decision.chosen)
    score_s = time.perf_counter() - t_score
    if aff is not None and inp.session and not dry_run:
        await affinity.put(policy, inp.session, decision.chosen, aff.ttl_s)
    return Selection(target=decision.chosen, policy=policy, decision=decision, router=router, shadow=shadow,
                     routing_s=time.perf_counter() - started, embed_s=embed_s, embed_cached=cached, score_s=score_s)


def _undecided(router: Router, policy: str, candidates: list[str], fallback: str | None, exc: Exception,
               started: float) -> Selection:
    """The selection when the prompt could not be embedded: the policy's configured fallback (or its first
    available candidate), the rest of its candidates in order as the fallbacks."""
    chosen = fallback if fallback in candidates else candidates[0]
    error = str(exc) or type(exc).__name__
    # Once per policy every LOG_EVERY_S while the embedder stays down (the metric counts every request).
    now = time.monotonic()
    if now - _last_logged.get(policy, -LOG_EVERY_S) >= LOG_EVERY_S:
        _last_logged[policy] = now
        log.warning("policy %s could not embed the prompt (%s): sent to %s", policy, error, chosen)
    order = [chosen, *[c for c in candidates if c != chosen]]
    decision = RoutingDecision(
        chosen=chosen, ranking=tuple(CandidateScore(name=c, score=0.0) for c in order),
        reason=f"embedding failed ({error}): the policy's fallback {chosen}", policy=policy,
        version=getattr(router, "version", "static") or "static")
    return Selection(target=chosen, policy=policy, decision=decision, router=router, embed_error=error,
                     routing_s=time.perf_counter() - started)


def _shadow_decision(router: Router, live: RoutingRequest, registry: WorkerRegistry) -> RoutingDecision | None:
    """The shadow policy's decision on the same prompt, among its own available candidates; a failing
    shadow is logged and never fails the request."""
    candidates = tuple(t for t in router.targets() if registry.usable(t)) or tuple(router.targets())
    req = RoutingRequest(request_id=live.request_id, text=live.text, candidates=candidates,
                         embedding=live.embedding, max_cost_usd=live.max_cost_usd, min_quality=live.min_quality,
                         queue={t: registry.queue(t) for t in candidates})
    try:
        return router.route(req)
    except Exception:
        log.exception("shadow policy %s failed", router.name)
        return None


def fallback_targets(sel: Selection, registry: WorkerRegistry, max_fallbacks: int) -> list[str]:
    """The targets to try in order: the decision's choice, then (when a policy ranked candidates) the next
    ones by its own ranking that have a usable worker, at most `max_fallbacks` of them. A session pinned by
    affinity has no fallbacks: its conversation stays where it started or fails."""
    if sel.decision is None or sel.affinity:
        return [sel.target]
    rest = [name for name in sel.decision.fallbacks() if name != sel.target and registry.usable(name)]
    return [sel.target, *list(dict.fromkeys(rest))[:max_fallbacks]]
