"""`SentenceTransformerEmbedder`: any sentence-transformers model from a local path or name, on the GPU when
there is one. sentence-transformers and torch are optional (`pip install turnout[st]`) and imported only when one
is built, so `routers` imports without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt


class SentenceTransformerEmbedder:
    """Any sentence-transformers model (a local directory or an already-cached name), normalised float32 rows.

    Imports sentence-transformers (and so torch) only here, so the rest of `routers` does not need them. Set
    `HF_HUB_OFFLINE=1` to make sure nothing is fetched from a model hub.
    """

    def __init__(self, model: str | Path, *, device: str | None = None, batch_size: int = 32) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(model), device=self.device)
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"{model}: the model does not declare its embedding dimension")
        self.dim: int = int(dim)
        self.id: str = st_embedder_id(str(model))

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One row per text in the caller's order (sentence-transformers sorts by length internally)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(rows, dtype=np.float32)


def st_embedder_id(model: str) -> str:
    """The id of the sentence-transformers embedder for `model` (a local path or a name)."""
    path = Path(model).resolve()
    # Packaged models often sit in a directory called just "model": keep its parent in the id too, so two such
    # models never share cached vectors.
    return f"st:{path.parent.name}/{path.name}" if path.exists() else f"st:{model}"
