"""A deterministic test embedder and artifacts trained with it, for live-routing tests.

`TopicEmbedder` puts prompts that mention "math" near one direction and all others near another (with
a little per-text variation), so a trained policy must send math prompts to the strong model and the
rest to the cheap one. It needs no model files and is fast enough for hundreds of requests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routers.artifacts import save_artifact
from routers.offline.dataset import RoutingData
from routers.offline.training import TrainOptions, train

F32 = npt.NDArray[np.float32]
DIM = 16
MODELS = ("fake-small", "fake-big")
_CENTERS = np.linalg.qr(np.random.default_rng(3).normal(size=(DIM, 2)))[0].T  # two orthonormal directions


class TopicEmbedder:
    """Embeds "math" prompts near one direction and the rest near another; counts its calls."""

    id = "test-topic-embedder"
    dim = DIM

    def __init__(self) -> None:
        self.calls: list[int] = []  # batch sizes

    def embed(self, texts: Sequence[str]) -> F32:
        """One unit row per text."""
        self.calls.append(len(texts))
        rows = np.empty((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
            noise = np.random.default_rng(seed).normal(size=DIM)
            v = _CENTERS[1 if "math" in text.lower() else 0] + 0.1 * noise
            rows[i] = v / np.linalg.norm(v)
        return rows


def topic_table(n: int = 200) -> RoutingData:
    """Even rows: small chat prompts both models answer; odd rows: math prompts only the big one does.
    The big model costs 10x."""
    prompts = [f"hard math problem number {i}" if i % 2 else f"friendly chat message {i}" for i in range(n)]
    scores = np.array([[0.0, 1.0] if i % 2 else [1.0, 1.0] for i in range(n)])
    costs = np.tile([1e-4, 1e-3], (n, 1))
    return RoutingData(prompts=prompts, models=list(MODELS), scores=scores, costs=costs,
                       tasks=np.array(["math" if i % 2 else "chat" for i in range(n)]), splits=None,
                       prompt_ids=[str(i) for i in range(n)], data_hash="topic-table", cost_source="table")


def train_artifacts(out: Path) -> dict[str, Path]:
    """knn, cost_aware and bandit artifacts trained on `topic_table()` with `TopicEmbedder`."""
    data = topic_table()
    emb = TopicEmbedder()
    x = emb.embed(data.prompts)
    opts = TrainOptions(cv_folds=3, knn_k=(5, 20), bandit_dim=4)
    return {kind: save_artifact(train(kind, data, x, emb.id, opts).artifact, out / kind)
            for kind in ("knn", "cost_aware", "bandit")}
