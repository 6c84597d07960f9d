"""From a request to a target: which policy, which candidates, the decision, its shadow, session affinity.

A request's `model` is a worker name or served model name (no routing), `"auto"` (the default policy, or
the one the `x-turnout-policy` header or the body's `turnout.policy` names) or `"turnout/<policy>"`.
`RoutingTable` holds the policies built from one config; a reload builds a whole new table and swaps one
reference, and each request keeps the table it started with.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from routers.base import CandidateScore, Router, RoutingDecision, RoutingRequest
from routers.registry import PolicyError, RouterContext, build_router
from routers.specs import PolicySpec
from server.config import ConfigError, TurnoutConfig
from server.embedding import EmbeddingService
from server.errors import GatewayError, bad_request, model_not_found, no_worker_available
from server.protocol import RouteOptions
from server.sessions import AffinityStore
from server.workers import WorkerRegistry

log = logging.getLogger("turnout.routing")

POLICY_PREFIX = "turnout/"
AUTO = "auto"
POLICY_HEADER = "x-turnout-policy"
SESSION_HEADER = "x-session-id"


class RoutingTable:
    """Policies built from one config, and the resolution of a request's `model` field.

    Building loads every learned policy's artifact; every policy that cannot be built is reported in one
    `ConfigError`, so a reload with a bad policy changes nothing.
    """

    def __init__(self, config: TurnoutConfig, ctx: RouterContext | None = None, source: str = "config") -> None:
        self.config = config
        self.default_policy = config.default_policy
        self.specs: dict[str, PolicySpec] = dict(config.policies)
        self.routers: dict[str, Router] = {}
        problems: list[str] = []
        for name, spec in config.policies.items():
            try:
                self.routers[name] = build_router(name, spec, ctx)
            except PolicyError as exc:
                problems.append(f"policies.{name}: {exc}")
        known = {w.name for w in config.workers} | {w.model for w in config.workers}
        for name, router in self.routers.items():
            missing = sorted(set(router.targets()) - known)
            if missing:
                problems.append(f"policies.{name}: routes to {missing}, which no worker serves; map them to "
                                f"workers or models with `models:` (known: {sorted(known)})")
        if problems:
            raise ConfigError(problems, source)
        self._direct = known

    def needs_embedding(self) -> bool:
        """Whether any policy looks at the prompt's embedding."""
        return any(r.needs_embedding for r in self.routers.values())

    def policy_for(self, model: str, explicit: str | None = None) -> str | None:
        """The policy a request uses, None for a direct worker/model name.

        `explicit` is the policy named by the header or the body's `turnout.policy`; it applies to `auto`
        and must agree with `turnout/<policy>`.
        """
        if explicit is not None and explicit not in self.routers:
            raise GatewayError(404, f"The policy '{explicit}' does not exist (policies: {sorted(self.routers)}).",
                               param="turnout.policy", code="policy_not_found")
        if model == AUTO:
            if explicit is not None:
                return explicit
            if self.default_policy is None:
                raise GatewayError(
                    404, "model 'auto' needs a default_policy in the gateway config, or a policy named by the "
                    f"'{POLICY_HEADER}' header or the body's 'turnout.policy'; none is set.",
                    param="model", code="model_not_found",
                )
            return self.default_policy
        if model.startswith(POLICY_PREFIX):
            name = model[len(POLICY_PREFIX):]
            if name not in self.routers:
                raise model_not_found(model)
            if explicit is not None and explicit != name:
                raise bad_request(f"model '{model}' and the requested policy '{explicit}' disagree; name one "
                                  "policy only.", "turnout.policy")
            return name
        if model not in self._direct:
            raise model_not_found(model)
        if explicit is not None:
            raise bad_request(f"model '{model}' names a worker directly, so no policy applies; use model 'auto' "
                              f"to route by policy '{explicit}'.", "model")
        return None

    def model_ids(self) -> list[str]:
        """What `GET /v1/models` lists: served models, then `auto` and every `turnout/<policy>`."""
        models = list(dict.fromkeys(w.model for w in self.config.workers))
        policies = [f"{POLICY_PREFIX}{p}" for p in self.routers]
        return models + ([AUTO] if self.default_policy else []) + policies


def artifact_context(config_path: str | Path | None, embedder_id: str | None) -> RouterContext:
    """The context policies are built in: relative artifact paths start at the config file's directory."""
    base = Path(config_path).resolve().parent if config_path else Path.cwd()
    return RouterContext(embedder_id=embedder_id, base_dir=base)


@dataclass(frozen=True, slots=True)
class RouteInput:
    """What routing reads from a request."""

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
        got = await embedding.embed(inp.text)
        vector, embed_s, cached = got.vector, got.wait_s, got.cached
    opts = inp.options
    req = RoutingRequest(
        request_id=request_id, text=inp.text, candidates=tuple(candidates), embedding=vector,
        max_cost_usd=opts.max_cost_usd if opts else None, min_quality=opts.min_quality if opts else None,
        queue={t: registry.queue(t) for t in candidates},
    )
    t_score = time.perf_counter()
    decision = router.route(req)
    shadow = None
    if shadow_router is not None:
        shadow = _shadow_decision(shadow_router, req, registry)
    score_s = time.perf_counter() - t_score
    if aff is not None and inp.session and not dry_run:
        await affinity.put(policy, inp.session, decision.chosen, aff.ttl_s)
    return Selection(target=decision.chosen, policy=policy, decision=decision, router=router, shadow=shadow,
                     routing_s=time.perf_counter() - started, embed_s=embed_s, embed_cached=cached, score_s=score_s)


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
