"""Caches for embeddings: `CachedEmbedder` (in memory, per prompt, for the gateway) and `embed_corpus` (on disk,
per table, for offline training and evaluation).

Nothing here depends on a particular model; it only needs an object with `id`, `dim` and `embed()`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routers.embedding.base import Embedder

__all__ = ["CachedEmbedder", "cache_dir", "cache_root", "corpus_key", "embed_corpus", "model_cache_dir", "text_key"]


def cache_root() -> Path:
    """Turnout's cache directory: `$TURNOUT_CACHE`, else `~/.cache/turnout`."""
    return Path(os.environ.get("TURNOUT_CACHE", Path.home() / ".cache" / "turnout"))


def cache_dir() -> Path:
    """Where table embeddings are kept between runs."""
    return cache_root() / "embeddings"


def model_cache_dir() -> Path:
    """Where derived model files (the static embedder's distilled table) are kept between runs."""
    return cache_root() / "models"


def text_key(text: str) -> bytes:
    """A 16-byte digest of a text: the in-memory cache's key. The cache costs the same per entry however long
    the prompts are (a text as its own key kept every cached prompt whole: megabytes per entry)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class CachedEmbedder:
    """An LRU cache of vectors keyed by a digest of the exact text (`text_key`), in front of another embedder.

    `embed()` looks every text up, embeds only the misses (each distinct text once, in one call to the inner
    embedder) and returns rows in the caller's order. There is no await between lookup and insert, so sharing
    one instance among asyncio tasks on one event loop is safe; it is not meant for several threads at once.
    """

    def __init__(self, inner: Embedder, maxsize: int = 10_000) -> None:
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, got {maxsize}")
        self.inner = inner
        self.maxsize = maxsize
        self.id: str = inner.id
        self.dim: int = inner.dim
        self.hits = 0
        self.misses = 0
        self._rows: OrderedDict[bytes, npt.NDArray[np.float32]] = OrderedDict()

    def __len__(self) -> int:
        """How many texts are cached."""
        return len(self._rows)

    def __contains__(self, text: object) -> bool:
        """Whether `text` is cached (does not count as a use)."""
        return isinstance(text, str) and text_key(text) in self._rows

    def clear(self) -> None:
        """Forget every cached vector (the counters are kept)."""
        self._rows.clear()

    def get(self, text: str) -> npt.NDArray[np.float32] | None:
        """The cached vector of `text` (marked most recently used), or None; counted as a hit or a miss."""
        key = text_key(text)
        row = self._rows.get(key)
        if row is None:
            self.misses += 1
            return None
        self._rows.move_to_end(key)
        self.hits += 1
        return row

    def put(self, text: str, row: npt.NDArray[np.float32]) -> None:
        """Store a vector computed elsewhere (e.g. by a batch), evicting the least recently used."""
        self._store(text_key(text), row)

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Rows for `texts` in order; only texts not cached are passed to the inner embedder."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: dict[bytes, tuple[str, list[int]]] = {}
        for i, text in enumerate(texts):
            key = text_key(text)
            row = self._rows.get(key)
            if row is None:
                missing.setdefault(key, (text, []))[1].append(i)
            else:
                self._rows.move_to_end(key)
                out[i] = row
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = self.inner.embed([text for text, _ in missing.values()])
            for (key, (_, positions)), row in zip(missing.items(), fresh, strict=True):
                out[positions] = row
                self._store(key, row)
        return out

    def _store(self, key: bytes, row: npt.NDArray[np.float32]) -> None:
        """Insert one vector as most recently used and evict the least recently used beyond `maxsize`."""
        if self.maxsize == 0:
            return
        # A copy, so that a cached row does not keep the inner embedder's whole batch array alive.
        self._rows[key] = row.copy()
        self._rows.move_to_end(key)
        while len(self._rows) > self.maxsize:
            self._rows.popitem(last=False)


def corpus_key(embedder_id: str, texts: Sequence[str]) -> str:
    """sha256 (hex) of an embedder id and a list of texts.

    Every part is length-prefixed, so no choice of texts can collide with another (["a b"] vs ["a", "b"]).
    """
    digest = hashlib.sha256()
    for part in (embedder_id, *texts):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    digest.update(len(texts).to_bytes(8, "big"))
    return digest.hexdigest()


def embed_corpus(
    embedder: Embedder,
    texts: Sequence[str],
    cache_dir: Path | None,
    *,
    chunk_size: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> npt.NDArray[np.float32]:
    """Embed a whole table of texts, reusing a stored result for the same embedder and the same texts.

    The result is stored as `<cache_dir>/<corpus_key>.npy` (written to a temporary file and renamed, so a crash
    never leaves a truncated file under the final name). With `cache_dir=None` nothing is stored. Texts are
    embedded shortest first in chunks of `chunk_size`, and `progress(done, total)` is called after each chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    path = cache_dir / f"{corpus_key(embedder.id, texts)}.npy" if cache_dir is not None else None
    if path is not None and path.exists():
        stored = np.load(path, allow_pickle=False)
        if stored.shape == (len(texts), embedder.dim) and stored.dtype == np.float32:
            if progress is not None:
                progress(len(texts), len(texts))
            return np.asarray(stored, dtype=np.float32)
        # A file of the wrong shape cannot be the result for these texts: recompute and replace it.

    out = np.empty((len(texts), embedder.dim), dtype=np.float32)
    # Sorting the whole table by length keeps every chunk's padding low, not just within one chunk.
    order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
    for start in range(0, len(texts), chunk_size):
        idx = order[start : start + chunk_size]
        out[idx] = embedder.embed([texts[i] for i in idx])
        if progress is not None:
            progress(min(start + chunk_size, len(texts)), len(texts))

    if path is not None:
        _save_atomically(path, out)
    return out


def _save_atomically(path: Path, array: npt.NDArray[np.float32]) -> None:
    """Write `array` to `path` via a temporary file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
