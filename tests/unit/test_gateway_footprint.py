"""The serving path stays lean: a gateway process that loads learned artifacts and routes never imports the
training stack (scikit-learn, scipy, pandas, pyarrow), torch or matplotlib. Importing scikit-learn alone once
cost the gateway about 100 MiB of resident memory against a 400 MiB target (see loadtest/results)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from routers.artifacts import save_artifact
from routers.offline.training import TrainOptions, train
from tests.unit.test_learned_routers import MODELS, two_topic_table

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("sklearn", "scipy", "pandas", "pyarrow", "torch", "matplotlib")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data, x = two_topic_table()
    opts = TrainOptions(knn_k=(5,), knn_temperature=(0.05,), probe_c=(1.0,), knn_weights=(0.0, 1.0), bandit_dim=4,
                        bandit_lambda=0.5)
    tmp = tmp_path_factory.mktemp("footprint")
    return {kind: str(save_artifact(train(kind, data, x, "test-embedder", opts).artifact, tmp / kind))
            for kind in ("knn", "cost_aware", "bandit")}


def test_serving_imports_no_training_stack(artifacts: dict[str, str]) -> None:
    # A fresh interpreter: this test process has imported scikit-learn for training already.
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import numpy as np
        import server.cli, server.app, server.gateway, server.policy.selection  # what `turnout serve` loads
        from routers.artifacts import load_artifact
        from routers.base import RoutingRequest
        from routers.from_artifact import router_from_artifact
        from routers.embedding.factory import make_embedder
        make_embedder("onnx").embed(["how far is the moon?"])  # the default embedder, loaded and run
        for kind, path in {json.dumps(artifacts)}.items():
            router = router_from_artifact(kind, load_artifact(Path(path), embedder_id="test-embedder",
                                                               models={MODELS!r}), lam=0.5)
            x = np.ones(16, dtype=np.float32) / 4.0
            router.route(RoutingRequest(request_id="r", text="hi", candidates=tuple({MODELS!r}), embedding=x))
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_train_without_the_training_extra_says_what_to_install(tmp_path: Path) -> None:
    # As in the gateway's image: scikit-learn not installed (hidden from this subprocess).
    script = textwrap.dedent("""
        import importlib.util, sys
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "sklearn" else real(name, *a)
        from server.cli import main
        sys.argv = ["turnout", "train", "--data", "t.parquet", "--router", "knn", "--out", "art"]
        main()
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    assert out.returncode == 1
    assert "sklearn missing" in out.stderr and "pip install 'turnout[train]'" in out.stderr
    assert not (tmp_path / "art").exists()
