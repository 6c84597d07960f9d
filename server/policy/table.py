"""`RoutingTable`: the policies built from one config, and which policy a request's `model` names.

A request's `model` is a worker name or served model name (no routing), `"auto"` (the default policy, or
the one the `x-turnout-policy` header or the body's `turnout.policy` names) or `"turnout/<policy>"`.
A reload builds a whole new table and swaps one reference, and each request keeps the table it started with.
"""

from __future__ import annotations

from pathlib import Path

from routers.base import Router
from routers.registry import PolicyError, RouterContext, build_router
from routers.specs import PolicySpec
from server.config import ConfigError, TurnoutConfig
from server.errors import GatewayError, bad_request, model_not_found

POLICY_PREFIX = "turnout/"
AUTO = "auto"
POLICY_HEADER = "x-turnout-policy"


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
            pooling = sorted({t for t in router.targets() for w in config.workers
                              if w.kind == "pooling" and t in (w.name, w.model)})
            if pooling:
                problems.append(f"policies.{name}: routes to {pooling}, served by embedding workers (kind "
                                "'pooling'), which answer no completions")
            fallback = getattr(self.specs[name], "fallback", None)
            if fallback is not None and fallback not in router.targets():
                problems.append(f"policies.{name}.fallback: {fallback!r} is not one of the policy's candidates "
                                f"({list(router.targets())})")
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
