"""The `Embedder` protocol every prompt embedder implements, and the normalisation they share.

Every embedder returns float32, L2-normalised rows, so a dot product is a cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors.

    `id` names the model and its pooling (and anything else that changes the vectors), so stored vectors are
    only reused with the embedder that made them. `embed` returns shape (len(texts), dim); (0, dim) for none.
    """

    id: str
    dim: int

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One float32, L2-normalised row per text, in the order given."""
        ...


def l2_normalise(rows: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """Rows scaled to unit length, as float32 (an all-zero row stays zero rather than becoming NaN)."""
    rows32 = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows32, axis=1, keepdims=True)
    return np.asarray(rows32 / np.maximum(norms, np.float32(1e-12)), dtype=np.float32)


def close_embedder(embedder: object) -> None:
    """Release what an embedder holds open (a remote embedder's connections); a no-op for local models."""
    close = getattr(embedder, "close", None)
    if callable(close):
        close()
