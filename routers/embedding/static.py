"""A static embedder distilled from all-MiniLM-L6-v2: one fixed vector per word piece, averaged per prompt.

Why: the transformer costs about 43 ms of CPU for an average routing prompt (66 word pieces) on these 2-core
machines, so a CPU-only gateway cannot embed 50 new prompts a second. A static embedder needs a tokenizer call and a
table lookup: tens of microseconds, whatever the load.

How: each word piece's vector is what MiniLM itself returns for a text made of that piece alone (the mean of its
hidden states over [CLS], the piece and [SEP], the same mean pooling as the sentence model). A prompt's vector is
the mean of its pieces' vectors, L2-normalised. The table is computed once from the packaged ONNX model (about
20 s on 2 cores) and kept in a cache directory; nothing is fetched from anywhere. Context is lost (word order, and
a piece means the same in every sentence), which costs little for routing: on llmrouter_9model the kNN router
reaches the same AIQ with either embedder (see the README's figures).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from routers.embedding.base import l2_normalise
from routers.embedding.onnx import DEFAULT_TOKENIZER, MINILM_ONNX_ID, OnnxMiniLMEmbedder, packaged_model_path

__all__ = ["STATIC_ID", "StaticEmbedder", "distil_table", "load_or_distil"]

#: The id of vectors made by `StaticEmbedder` over the packaged model's distilled table. Bump the suffix when the
#: distillation changes, so artifacts trained on older vectors are refused.
STATIC_ID = f"static-{MINILM_ONNX_ID}-v1"
#: Word pieces read per prompt. The cost is linear, so this only bounds the work a huge prompt can cause.
STATIC_MAX_PIECES = 2048
#: Word pieces embedded per model call while distilling (three positions each).
_DISTIL_BATCH = 1024


def distil_table(model: OnnxMiniLMEmbedder, ids: Sequence[int] | None = None) -> npt.NDArray[np.float32]:
    """Each word piece's vector: the model's mean hidden state over `[CLS] piece [SEP]` (not normalised, so that
    averaging keeps each piece's weight as the model gives it). Rows for every vocabulary id, or for `ids` only."""
    tok = model.tokenizer
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise ValueError("the tokenizer has no [CLS] or [SEP] token")
    wanted = np.arange(tok.get_vocab_size(), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    table = np.empty((len(wanted), model.dim), dtype=np.float32)
    for start in range(0, len(wanted), _DISTIL_BATCH):
        chunk = wanted[start : start + _DISTIL_BATCH]
        seq = np.stack([np.full_like(chunk, cls), chunk, np.full_like(chunk, sep)], axis=1)
        table[start : start + len(chunk)] = model.hidden_mean(seq)
    return table


def _table_key(model_path: Path, tokenizer_path: Path) -> str:
    """A key that changes with the model file, the tokenizer file or the distillation."""
    h = hashlib.sha256(STATIC_ID.encode())
    for path in (model_path, tokenizer_path):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def load_or_distil(cache_dir: Path | None, tokenizer_path: Path = DEFAULT_TOKENIZER) -> npt.NDArray[np.float32]:
    """The distilled table of the packaged model: read from `cache_dir` when there, else distilled (and stored
    there, written to a temporary file and renamed so that concurrent processes never read half a file). The
    model itself is loaded only to distil: a process reading a stored table never builds an inference session
    (measured twice in a bare process with the embedder loaded: 112 MiB resident and at peak, against 144-172 MiB
    resident and a 275 MiB peak when the session was built to compute the table's key)."""
    model_path = packaged_model_path()
    vocab = Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    path = cache_dir / f"static-minilm-{_table_key(model_path, tokenizer_path)}.npy" if cache_dir is not None else None
    if path is not None and path.exists():
        table = np.load(path)
        if table.ndim == 2 and table.shape[0] == vocab and table.dtype == np.float32:
            return np.asarray(table)
    table = distil_table(OnnxMiniLMEmbedder(model_path, tokenizer_path=tokenizer_path))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, table)
        os.replace(tmp, path)
    return table


class StaticEmbedder:
    """Prompt vector = L2-normalised mean of its word pieces' rows in `table` ([CLS] and [SEP] not included).

    A text with no word pieces (empty, or only whitespace) gets the zero vector, as a prompt with nothing in it
    should not look like any other.
    """

    def __init__(
        self, table: npt.NDArray[np.float32], tokenizer_path: Path = DEFAULT_TOKENIZER, *, embedder_id: str = STATIC_ID
    ) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(STATIC_MAX_PIECES)
        if table.ndim != 2 or table.shape[0] != self.tokenizer.get_vocab_size():
            raise ValueError(
                f"table of shape {table.shape} does not match the tokenizer's {self.tokenizer.get_vocab_size()} pieces"
            )
        self.table = np.ascontiguousarray(table, dtype=np.float32)
        self.dim: int = int(table.shape[1])
        self.id: str = embedder_id

    @classmethod
    def from_minilm(cls, cache_dir: Path | None) -> StaticEmbedder:
        """The packaged MiniLM's distilled table (see `load_or_distil`)."""
        return cls(load_or_distil(cache_dir))

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One row per text in the caller's order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        # One text (a live request) is encoded directly: the batch call hands it to the tokenizer's thread pool.
        encodings = ([self.tokenizer.encode(texts[0], add_special_tokens=False)] if len(texts) == 1
                     else self.tokenizer.encode_batch(list(texts), add_special_tokens=False))
        for i, enc in enumerate(encodings):
            if enc.ids:
                out[i] = self.table[enc.ids].mean(axis=0)
        return l2_normalise(out)
