"""The routing table: what a request's `model` field means, built once per config.

`model` is a worker name or served model name (no routing), `"auto"` (the default policy) or
`"turnout/<policy>"`. A reload builds a whole new table and swaps one reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from routers.base import Router, RoutingDecision, RoutingRequest
from routers.registry import RouterContext, build_router
from server.config import TurnoutConfig
from server.errors import GatewayError, model_not_found

POLICY_PREFIX = "turnout/"
AUTO = "auto"


@dataclass(frozen=True, slots=True)
class Selection:
    """Where a request goes: a target (worker or model name), and the policy and decision if routed."""

    target: str
    policy: str | None = None
    decision: RoutingDecision | None = None


class RoutingTable:
    """Policies built from one config, and the resolution of a request's `model` field."""

    def __init__(self, config: TurnoutConfig, ctx: RouterContext | None = None) -> None:
        self.config = config
        self.default_policy = config.default_policy
        self.routers: dict[str, Router] = {
            name: build_router(name, spec, ctx) for name, spec in config.policies.items()
        }
        self._direct = {w.name for w in config.workers} | {w.model for w in config.workers}

    def policy_for(self, model: str) -> str | None:
        """The policy named by `model`, None for a direct worker/model name; 404 if it names nothing."""
        if model == AUTO:
            if self.default_policy is None:
                raise GatewayError(
                    404, "model 'auto' needs a default_policy in the gateway config; none is set.",
                    param="model", code="model_not_found",
                )
            return self.default_policy
        if model.startswith(POLICY_PREFIX):
            name = model[len(POLICY_PREFIX):]
            if name in self.routers:
                return name
            raise model_not_found(model)
        if model in self._direct:
            return None
        raise model_not_found(model)

    def select(self, model: str, request_id: str, text: str) -> Selection:
        """Resolve `model` and, for a policy, ask it for a decision."""
        policy = self.policy_for(model)
        if policy is None:
            return Selection(target=model)
        router = self.routers[policy]
        candidates = tuple(router.targets())
        decision = router.route(RoutingRequest(request_id=request_id, text=text, candidates=candidates))
        return Selection(target=decision.chosen, policy=policy, decision=decision)

    def model_ids(self) -> list[str]:
        """What `GET /v1/models` lists: served models, then `auto` and every `turnout/<policy>`."""
        models = list(dict.fromkeys(w.model for w in self.config.workers))
        policies = [f"{POLICY_PREFIX}{p}" for p in self.routers]
        return models + ([AUTO] if self.default_policy else []) + policies
