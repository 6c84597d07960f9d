"""Embeddings from a remote OpenAI-compatible `/v1/embeddings` server (`embedder.backend: openai`).

For example a vLLM worker in pooling mode serving a small language model's hidden states, or a text
embeddings server on a GPU, so the gateway's CPU does not embed. Texts are sent in batches (one request per
`embed` call, cut to `max_chars` each so the work per request is bounded); the vectors are checked (count,
order, dimension) and L2-normalised. After a failure the embedder fails fast for `retry_after_s` (no request
waits out another timeout while the server is known to be down), then tries again.

The id, `openai:<model>`, is what artifacts are pinned to: an artifact trained through one served model is
refused by a gateway whose embedder serves another.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from routers.embedding.base import l2_normalise

F32 = npt.NDArray[np.float32]


class EmbedderUnavailable(RuntimeError):
    """The embedding server could not give vectors (down, too slow, refused, or answered nonsense)."""


def remote_embedder_id(model: str) -> str:
    """The id of the remote embedder serving `model`."""
    return f"openai:{model}"


class RemoteEmbedder:
    """An `Embedder` backed by `POST {base_url}/embeddings`."""

    def __init__(self, base_url: str, model: str, dim: int | None = None, *, api_key: str | None = None,
                 timeout_s: float = 2.0, retry_after_s: float = 5.0, max_chars: int = 8192,
                 truncate_prompt_tokens: int | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.id = remote_embedder_id(model)
        self.model, self.max_chars = model, max_chars
        self.truncate_prompt_tokens = truncate_prompt_tokens
        self.retry_after_s = retry_after_s
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, headers=headers,
                                    transport=transport)
        self._down_until = 0.0
        self._last_error = ""
        # Without a configured dimension, ask once (the training commands do; the gateway's config names it, so
        # the gateway starts while the server is still down).
        self.dim = dim if dim is not None else int(self._call(["dimension probe"]).shape[1])

    def embed(self, texts: Sequence[str]) -> F32:
        """One L2-normalised row per text; `EmbedderUnavailable` when the server cannot give them."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if time.monotonic() < self._down_until:
            raise EmbedderUnavailable(f"{self.id}: {self._last_error} (not retried for {self.retry_after_s:g} s)")
        try:
            rows = self._call(texts)
        except EmbedderUnavailable as exc:
            self._down_until = time.monotonic() + self.retry_after_s
            self._last_error = str(exc).removeprefix(f"{self.id}: ")
            raise
        if rows.shape[1] != self.dim:
            raise EmbedderUnavailable(f"{self.id}: vectors of {rows.shape[1]} dimensions, expected {self.dim}")
        return rows

    def _call(self, texts: Sequence[str]) -> F32:
        body: dict[str, Any] = {"model": self.model, "input": [t[: self.max_chars] or " " for t in texts],
                                "encoding_format": "float"}
        if self.truncate_prompt_tokens is not None:
            body["truncate_prompt_tokens"] = self.truncate_prompt_tokens
        try:
            resp = self._client.post("/embeddings", json=body)
        except httpx.TimeoutException:
            raise EmbedderUnavailable(f"{self.id}: no answer within {self._client.timeout.read} s") from None
        except httpx.HTTPError as exc:
            raise EmbedderUnavailable(f"{self.id}: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raise EmbedderUnavailable(f"{self.id}: HTTP {resp.status_code}: {resp.text[:200]}")
        return l2_normalise(_vectors(resp, len(texts), self.id))

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()


def _vectors(resp: httpx.Response, n: int, who: str) -> F32:
    """The response's vectors in input order, or `EmbedderUnavailable` saying what is wrong with them."""
    try:
        data = resp.json()["data"]
        by_index = {int(item["index"]): item["embedding"] for item in data}
        rows = np.asarray([by_index[i] for i in range(n)], dtype=np.float32)
    except (ValueError, KeyError, TypeError) as exc:
        raise EmbedderUnavailable(f"{who}: an answer that is not {n} embeddings ({type(exc).__name__})") from None
    if rows.ndim != 2 or rows.shape[0] != n or rows.shape[1] == 0 or not np.isfinite(rows).all():
        raise EmbedderUnavailable(f"{who}: an answer that is not {n} finite embeddings")
    return rows
