"""Embedders by their short spec ("onnx", "static", "st:<path or name>", "openai:<model>@<base url>"): their ids
without loading anything, and the embedders themselves."""

from __future__ import annotations

import os
from pathlib import Path

from routers.embedding.base import Embedder
from routers.embedding.onnx import MINILM_ONNX_ID, OnnxMiniLMEmbedder
from routers.embedding.remote import RemoteEmbedder, remote_embedder_id
from routers.embedding.st import SentenceTransformerEmbedder, st_embedder_id
from routers.embedding.static import STATIC_ID, StaticEmbedder

_SPECS = "expected 'onnx', 'minilm', 'static', 'st:<path or name>' or 'openai:<model>@<base url>'"
#: Where `make_embedder` finds the API key of an `openai:` spec's server (a key never goes in a spec).
API_KEY_ENV = "TURNOUT_EMBEDDER_API_KEY"


def _remote(spec: str) -> tuple[str, str] | None:
    """(model, base url) of an "openai:<model>@<base url>" spec, else None."""
    if not spec.startswith("openai:"):
        return None
    model, sep, url = spec[len("openai:"):].rpartition("@")
    if not sep or not model or not url.startswith(("http://", "https://")):
        raise ValueError(f"embedder spec {spec!r}: expected 'openai:<model>@<base url>', e.g. "
                         "'openai:my-embedder@http://127.0.0.1:8001/v1'")
    return model, url


def embedder_id(spec: str) -> str:
    """The id `make_embedder(spec)` would have, without loading any model (for checking artifacts)."""
    spec = spec.strip()
    if spec.lower() in ("onnx", "minilm"):
        return MINILM_ONNX_ID
    if spec.lower() == "static":
        return STATIC_ID
    if spec.startswith("st:") and spec[3:].strip():
        return st_embedder_id(spec[3:].strip())
    remote = _remote(spec)
    if remote is not None:
        return remote_embedder_id(remote[0])
    raise ValueError(f"unknown embedder spec {spec!r}: {_SPECS}")


def make_embedder(spec: str, cache_dir: Path | None = None) -> Embedder:
    """Build an embedder from a short spec: "onnx" or "minilm" (the default int8 model on the CPU), "static" (word
    piece vectors distilled from it, see `routers.embedding.static`; its table is kept in `cache_dir` when given), or
    "st:<path or name>" (sentence-transformers) or "openai:<model>@<base url>" (a remote /v1/embeddings server, asked
    once for its dimension; its API key, if any, from the environment variable TURNOUT_EMBEDDER_API_KEY). The
    result is not cached; wrap it in `routers.embedding.cache.CachedEmbedder`."""
    spec = spec.strip()
    if spec.lower() in ("onnx", "minilm"):
        return OnnxMiniLMEmbedder()
    if spec.lower() == "static":
        return StaticEmbedder.from_minilm(cache_dir)
    if spec.startswith("st:") and spec[3:].strip():
        return SentenceTransformerEmbedder(spec[3:].strip())
    remote = _remote(spec)
    if remote is not None:
        # Training reads whole tables: a generous timeout per batch.
        return RemoteEmbedder(remote[1], remote[0], api_key=os.environ.get(API_KEY_ENV), timeout_s=60.0,
                              retry_after_s=0.0)
    raise ValueError(f"unknown embedder spec {spec!r}: {_SPECS}")
