"""The Kubernetes manifests: every overlay renders with `kubectl kustomize` and validates against the
Kubernetes schemas (`kubernetes-validate --strict`, offline), and the rendered parts fit together: the
gateway's config names worker Services that exist, probes hit the endpoints the gateway and vLLM serve."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from server.config import parse_config
from testkit.procs import system_binary

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ("gpu", "cpu")
K8S_VERSION = "1.32.0"


def render(overlay: str) -> str:
    out = subprocess.run([system_binary("kubectl"), "kustomize", str(REPO / "deploy" / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def by_kind(text: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text) if d}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(render(overlay))
    validator = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    if validator is None:
        pytest.fail("kubernetes-validate is not installed: `make test` installs it (the dev extra)")
    out = subprocess.run([validator, "--strict", "-k", K8S_VERSION, str(rendered)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARN" not in out.stdout + out.stderr, "every resource has a schema (no unknown kind or version)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_parts_fit_together(overlay: str) -> None:
    docs = by_kind(render(overlay))
    services = {name for kind, name in docs if kind == "Service"}
    config_map = next(d for (kind, _), d in docs.items() if kind == "ConfigMap")
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]))
    for worker in config.workers:
        assert urlparse(worker.base_url).hostname in services, worker.name
        assert worker.health_url is not None and urlparse(worker.health_url).path == "/health"
    gateway = docs[("Deployment", "turnout-gateway")]["spec"]["template"]["spec"]
    container = gateway["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"], "the generated name"
    assert gateway["terminationGracePeriodSeconds"] > config.server.drain_timeout_s + 5
    hpa = docs[("HorizontalPodAutoscaler", "turnout-gateway")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "turnout-gateway" and hpa["minReplicas"] >= 1
    assert docs[("PodDisruptionBudget", "turnout-gateway")]["spec"]["minAvailable"] >= 1
    for name in ("vllm-small", "vllm-large"):
        pod = docs[("Deployment", name)]["spec"]["template"]
        vllm = pod["spec"]["containers"][0]
        assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        gpus = vllm["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus == "1") if overlay == "gpu" else gpus is None
    assert ("StatefulSet", "turnout-redis") in docs and "turnout-redis" in services
