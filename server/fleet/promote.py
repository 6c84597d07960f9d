"""From a trained artifact to traffic: the policy's config block, its models mapped onto the config's workers,
and a copy of the config that runs it as the live policy's decision-only `shadow` (first) or as the default
policy (once its shadow decisions read well). The copy is checked as `turnout check-config` checks a config
before it is written, so a reload of it cannot be refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from routers.artifacts import load_artifact
from server.config import ConfigError, TurnoutConfig
from server.snapshot import check_config_file


def model_mapping(config: TurnoutConfig, models: list[str], overrides: dict[str, str]) -> dict[str, str]:
    """Each artifact model -> the config's worker or model name that serves it (`ConfigError` naming every model
    that maps to nothing). Names the config serves map to themselves and are left out of the block."""
    known = {w.name for w in config.workers} | {w.model for w in config.workers}
    mapping = {m: overrides.get(m, m) for m in models}
    missing = [f"{m} -> {t}" if m in overrides else m for m, t in mapping.items() if t not in known]
    if missing:
        raise ConfigError([f"artifact model {m} is served by no worker of the config (workers and models: "
                           f"{sorted(known)}); map it with --map MODEL=WORKER" for m in missing])
    return {m: t for m, t in mapping.items() if m != t}


def policy_block(config: TurnoutConfig, artifact_dir: Path, name: str, overrides: dict[str, str],
                 lam: float | None = None) -> dict[str, Any]:
    """The policy's config entry for the artifact in `artifact_dir`."""
    artifact = load_artifact(artifact_dir)
    block: dict[str, Any] = {"type": artifact.router, "artifact": str(artifact_dir)}
    if lam is not None and artifact.router in ("knn", "cost_aware", "bandit"):
        block["lambda"] = lam
    mapped = model_mapping(config, artifact.models, overrides)
    if mapped:
        block["models"] = mapped
    return block


def promoted_config(config_path: Path, block: dict[str, Any], name: str, *, shadow_of: str | None,
                    make_default: bool, out_dir: Path | None = None) -> str:
    """The config file's YAML with policy `name` added, as `shadow_of`'s shadow and/or as the default policy;
    `ConfigError` (listing every problem) when the result would not load from `out_dir` (where it will be
    written: relative artifact paths start there; default the config's own directory)."""
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    policies = raw.setdefault("policies", {})
    if name in policies:
        raise ConfigError([f"--name {name}: the config has a policy of that name already; choose another"])
    policies[name] = block
    if shadow_of is not None:
        if shadow_of not in policies:
            raise ConfigError([f"--shadow-of {shadow_of}: no such policy (policies: {sorted(policies)})"])
        policies[shadow_of] = {**policies[shadow_of], "shadow": name}
    if make_default:
        raw["default_policy"] = name
    text = yaml.safe_dump(raw, sort_keys=False)
    check = (out_dir or config_path.parent) / f".{config_path.stem}.promote-check.yaml"
    try:
        check.write_text(text, encoding="utf-8")
        check_config_file(check)
    finally:
        check.unlink(missing_ok=True)
    return text
