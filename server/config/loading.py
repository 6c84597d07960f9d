"""Loading a config: YAML to `TurnoutConfig`, with every problem reported at once: schema errors from pydantic
and cross-reference errors (unique names, references to workers that exist, a default policy that exists) are
gathered into one `ConfigError`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from routers.registry import REGISTRY
from server.config.schema import ConfigError, TurnoutConfig


def field_path(parts: tuple[int | str, ...]) -> str:
    """A pydantic error location as the user wrote it: `workers[0].price`, `messages[1].content`."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _schema_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        # pydantic puts the discriminator tag after the policy name: ("policies", name, "fixed", ...).
        if len(loc) > 2 and loc[0] == "policies" and loc[2] in _POLICY_TYPES:
            loc = loc[:2] + loc[3:]
        problems.append(f"{field_path(loc) or '(top level)'}: {err['msg']}")
    return problems


_POLICY_TYPES = set(REGISTRY)


def _policy_targets(spec: Any) -> list[str]:
    """Names a policy refers to, read leniently from raw YAML so it works even when the schema fails."""
    if not isinstance(spec, dict):
        return []
    targets: list[str] = []
    if isinstance(spec.get("worker"), str):
        targets.append(spec["worker"])
    if isinstance(spec.get("weights"), dict):
        targets.extend(str(k) for k in spec["weights"])
    if isinstance(spec.get("models"), dict):  # learned policies: artifact model -> config name
        targets.extend(str(v) for v in spec["models"].values())
    return targets


def _cross_problems(raw: dict[str, Any]) -> list[str]:
    """References between sections, checked on the raw mapping so every problem shows at once."""
    problems: list[str] = []
    raw_workers = raw.get("workers")
    workers: list[Any] = raw_workers if isinstance(raw_workers, list) else []
    names: list[str] = [w["name"] for w in workers if isinstance(w, dict) and isinstance(w.get("name"), str)]
    models: set[str] = {w["model"] for w in workers if isinstance(w, dict) and isinstance(w.get("model"), str)}
    for name, n in Counter(names).items():
        if n > 1:
            problems.append(f"workers: name {name!r} is used by {n} workers; names must be unique")
    # `model` in a request may name a worker, a model, `auto` or `turnout/<policy>`: each must be unambiguous.
    for w in workers:
        if not isinstance(w, dict):
            continue
        for key in ("name", "model"):
            value = w.get(key)
            if isinstance(value, str) and (value == "auto" or value.startswith("turnout/")):
                problems.append(f"workers: {key} {value!r} is reserved ('auto' and 'turnout/...' select policies)")
        wname, wmodel = w.get("name"), w.get("model")
        if isinstance(wname, str) and wname in models and wname != wmodel:
            problems.append(f"workers: worker name {wname!r} is also another worker's model name; "
                            "a request for it would be ambiguous")
    # Replicas of one model must agree on its price, else cost accounting depends on load balancing.
    prices: dict[str, Any] = {}
    for w in workers:
        if isinstance(w, dict) and isinstance(w.get("model"), str):
            price = w.get("price")
            if price is None or isinstance(price, dict):  # compare with the defaults filled in
                price = {"input_per_1m": 0.0, "output_per_1m": 0.0, **(price or {})}
            if w["model"] in prices and prices[w["model"]] != price:
                problems.append(f"workers: replicas of model {w['model']!r} have different prices")
            prices.setdefault(w["model"], price)
    # A model's replicas are all of one kind, so a request for it never lands on a server that cannot answer it.
    kinds: dict[str, set[str]] = {}
    for w in workers:
        if isinstance(w, dict) and isinstance(w.get("model"), str):
            kinds.setdefault(w["model"], set()).add(str(w.get("kind", "generate")))
    for model, ks in kinds.items():
        if len(ks) > 1:
            problems.append(f"workers: replicas of model {model!r} are of different kinds ({', '.join(sorted(ks))})")
    raw_policies = raw.get("policies")
    policies: dict[str, Any] = raw_policies if isinstance(raw_policies, dict) else {}
    known: set[str] = set(names) | models
    for pname, spec in policies.items():
        if pname in known:
            problems.append(f"policies.{pname}: a policy may not share its name with a worker or model")
        for target in _policy_targets(spec):
            if target not in known:
                problems.append(f"policies.{pname}: unknown worker or model {target!r} (known: {sorted(known)})")
        shadow = spec.get("shadow") if isinstance(spec, dict) else None
        if isinstance(shadow, str) and (shadow == pname or shadow not in policies):
            problems.append(f"policies.{pname}.shadow: {shadow!r} must name another policy "
                            f"(known: {sorted(set(policies) - {pname})})")
    srv = raw.get("server")
    ref = srv.get("reference_model") if isinstance(srv, dict) else None
    if isinstance(ref, str) and ref not in models:
        problems.append(f"server.reference_model: {ref!r} is no worker's model (models: {sorted(models)})")
    embedder = raw.get("embedder")
    if isinstance(embedder, dict) and embedder.get("backend") == "st" and not embedder.get("model_path"):
        problems.append("embedder.model_path: the 'st' backend needs a local model directory")
    default = raw.get("default_policy")
    if default is not None and default not in policies:
        problems.append(f"default_policy: unknown policy {default!r} (known: {sorted(policies)})")
    problems += _key_problems(raw.get("auth"), set(policies), known)
    return problems


def _key_problems(auth: Any, policies: set[str], known: set[str]) -> list[str]:
    """Keys: unique names and hashes, and only policies and models that exist."""
    keys = auth.get("keys") if isinstance(auth, dict) else None
    if not isinstance(keys, list):
        return []
    problems: list[str] = []
    items = [k for k in keys if isinstance(k, dict)]
    for what in ("name", "key_sha256", "key_env"):
        values: list[str] = [k[what] for k in items if isinstance(k.get(what), str)]
        for value, n in Counter(values).items():
            shown = value[:8] + "..." if what == "key_sha256" else value  # a hash prefix is enough to find it
            if n > 1:
                problems.append(f"auth.keys: {what} {shown!r} is used by {n} keys")
    for i, k in enumerate(items):
        for p in k.get("policies") or []:
            if p not in policies:
                problems.append(f"auth.keys[{i}].policies: unknown policy {p!r} (known: {sorted(policies)})")
        for m in k.get("models") or []:
            if m not in known:
                problems.append(f"auth.keys[{i}].models: unknown worker or model {m!r}")
    return problems


def parse_config(raw: Any, source: str = "config") -> TurnoutConfig:
    """Validate a mapping (parsed YAML) into a `TurnoutConfig`, or raise `ConfigError` listing all problems."""
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): expected a mapping, got {type(raw).__name__}"], source)
    problems: list[str] = []
    config: TurnoutConfig | None = None
    try:
        config = TurnoutConfig.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_schema_problems(exc))
    problems.extend(_cross_problems(raw))
    if problems or config is None:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | Path) -> TurnoutConfig:
    """Read and validate a YAML config file; `ConfigError` for a missing file, bad YAML or bad content."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read {p}: {exc.strerror or exc}"], str(p)) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], str(p)) from exc
    return parse_config(raw, str(p))
