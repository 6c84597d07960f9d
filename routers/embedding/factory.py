"""Embedders by their short spec ("onnx", "static", "st:<path or name>"): their ids without loading anything,
and the embedders themselves."""

from __future__ import annotations

from pathlib import Path

from routers.embedding.base import Embedder
from routers.embedding.cache import CachedEmbedder
from routers.embedding.onnx import MINILM_ONNX_ID, OnnxMiniLMEmbedder
from routers.embedding.st import SentenceTransformerEmbedder, st_embedder_id
from routers.embedding.static import STATIC_ID, StaticEmbedder

_SPECS = "expected 'onnx', 'minilm', 'static' or 'st:<path or name>'"


def embedder_id(spec: str) -> str:
    """The id `make_embedder(spec)` would have, without loading any model (for checking artifacts)."""
    spec = spec.strip()
    if spec.lower() in ("onnx", "minilm"):
        return MINILM_ONNX_ID
    if spec.lower() == "static":
        return STATIC_ID
    if spec.startswith("st:") and spec[3:].strip():
        return st_embedder_id(spec[3:].strip())
    raise ValueError(f"unknown embedder spec {spec!r}: {_SPECS}")


def make_embedder(spec: str, cache_dir: Path | None = None) -> Embedder:
    """Build an embedder from a short spec: "onnx" or "minilm" (the default int8 model on the CPU), "static" (word
    piece vectors distilled from it, see `routers.embedding.static`; its table is kept in `cache_dir` when given), or
    "st:<path or name>" (sentence-transformers). The result is not cached; wrap it in `CachedEmbedder`."""
    spec = spec.strip()
    if spec.lower() in ("onnx", "minilm"):
        return OnnxMiniLMEmbedder()
    if spec.lower() == "static":
        return StaticEmbedder.from_minilm(cache_dir)
    if spec.startswith("st:") and spec[3:].strip():
        return SentenceTransformerEmbedder(spec[3:].strip())
    raise ValueError(f"unknown embedder spec {spec!r}: {_SPECS}")


def default_embedder() -> Embedder:
    """The gateway's embedder: the ONNX MiniLM model behind an in-memory LRU cache of exact prompts."""
    return CachedEmbedder(OnnxMiniLMEmbedder())
