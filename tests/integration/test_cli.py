"""`turnout serve` and `turnout check-config` as real commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from testkit.engines import PY_ENV, REPO
from testkit.procs import ManagedProcess, free_port
from tests.conftest import Upstream, fake_config


def test_serve_reads_turnout_config_from_the_environment(fakes: dict[str, Upstream], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(fake_config(fakes)))
    port = free_port()
    with ManagedProcess([sys.executable, "-m", "server", "serve", "--port", str(port)],
                        ready_url=f"http://127.0.0.1:{port}/healthz", cwd=REPO,
                        env={**PY_ENV, "TURNOUT_CONFIG": str(cfg)}):
        ids = [m["id"] for m in httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]]
    assert "turnout/cheap" in ids


@pytest.mark.parametrize("args", [["serve", "--config", "{bad}"], ["check-config", "{bad}"]])
def test_bad_config_is_refused_with_every_problem(tmp_path: Path, args: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"workers": [{"name": "a", "model": "m", "base_url": "nope"}],
                                   "policies": {"p": {"type": "fixed", "worker": "ghost"}}, "default_policy": "x"}))
    env = {k: v for k, v in os.environ.items() if k != "TURNOUT_CONFIG"}
    res = subprocess.run([sys.executable, "-m", "server", *[a.format(bad=bad) for a in args]], cwd=REPO,
                         env={**env, **PY_ENV}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert "3 problem(s)" in out
    assert "workers[0].base_url" in out and "ghost" in out and "default_policy" in out
    assert "Traceback" not in out


def test_serve_without_config_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TURNOUT_CONFIG"}
    res = subprocess.run([sys.executable, "-m", "server", "serve"], cwd=REPO, env={**env, **PY_ENV},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "TURNOUT_CONFIG" in res.stderr
