"""Prompt embedding inside the gateway: an LRU cache, then micro-batches run off the event loop.

Every text is cut to `max_chars` characters first, so the work per request is bounded whatever a client sends (a
tokenizer reads the whole text before it truncates to the model's 256 word pieces: a megabyte took seconds). The
cut is far past what the model reads (256 pieces are a few thousand characters at most in any language), so it
does not change a vector.

Concurrent requests that miss the cache within `max_wait_ms` of each other are embedded in one model call
(one call of 8 short prompts costs far less than 8 calls of one). The model runs in one dedicated thread,
so batches never compete with each other for the two cores, and the event loop keeps serving streams
while a batch runs (onnxruntime releases the GIL).

An embedder cheaper than the hand-off to that thread (the static one: 0.07 ms of CPU for a 200-character prompt,
0.5 ms for 2,000) embeds texts up to `inline_chars` characters on the event loop instead: at 100 new prompts a
second the thread's queue, wake-ups and futures took 12% of the routed gateway's CPU samples
(`loadtest/results/profile.md`, before this change). Longer texts still go to the thread, so no request holds the
loop for more than about half a millisecond.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from routers.embedding.base import Embedder, close_embedder
from routers.embedding.cache import CachedEmbedder, model_cache_dir
from routers.embedding.factory import make_embedder
from routers.embedding.remote import RemoteEmbedder
from server.config import EmbedderConfig
from server.tasks import cancel_and_wait

F32 = npt.NDArray[np.float32]
#: Texts up to this many characters are embedded on the event loop by the static embedder (see the module docstring).
STATIC_INLINE_CHARS = 2048


def build_embedder(cfg: EmbedderConfig) -> Embedder:
    """The embedder the config describes (a local model is loaded here; a remote one is not called)."""
    if cfg.backend == "openai":
        assert cfg.url is not None and cfg.model is not None and cfg.dimensions is not None  # checked by the config
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        return RemoteEmbedder(cfg.url, cfg.model, cfg.dimensions, api_key=key, timeout_s=cfg.timeout_s,
                              retry_after_s=cfg.retry_after_s, max_chars=cfg.max_chars,
                              truncate_prompt_tokens=cfg.truncate_prompt_tokens)
    return make_embedder(cfg.spec(), model_cache_dir())


@dataclass(frozen=True, slots=True)
class Embedded:
    """One prompt's vector, whether it came from the cache, and the time the caller waited for it."""

    vector: F32
    cached: bool
    wait_s: float


class EmbeddingService:
    """`await embed(text)`: cached, or batched with the other requests of the next few milliseconds."""

    def __init__(self, embedder: Embedder, *, cache_size: int = 10_000, max_batch: int = 32,
                 max_wait_ms: float = 2.0, max_chars: int = 8192, inline_chars: int = 0) -> None:
        """`inline_chars`: texts up to this long are embedded on the event loop, not batched on the thread (0:
        never; only for an embedder that costs less than the hand-off)."""
        self.embedder = embedder
        self.max_chars, self.inline_chars = max_chars, inline_chars
        self.id, self.dim = embedder.id, embedder.dim
        # The cache is only touched on the event loop thread; the model only in the executor.
        self.cache = CachedEmbedder(embedder, maxsize=cache_size)
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[str, asyncio.Future[F32]]] | None = None
        self._waiting: dict[str, asyncio.Future[F32]] = {}  # texts queued or being embedded: share the result
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turnout-embed")
        self.batches = 0
        self.batched_texts = 0

    def start(self) -> None:
        """Start the batching task (on the running loop)."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run(), name="turnout-embed")

    async def stop(self) -> None:
        """Stop batching; requests still waiting get a `RuntimeError`."""
        await cancel_and_wait(self._task)
        self._task = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(RuntimeError("the embedding service stopped"))
        self._waiting.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        close_embedder(self.embedder)

    async def embed(self, text: str) -> Embedded:
        """The L2-normalised vector of `text` (of its first `max_chars` characters)."""
        t = time.perf_counter()
        text = text[: self.max_chars]
        row = self.cache.get(text)
        if row is not None:
            return Embedded(row, True, time.perf_counter() - t)
        if self._task is None:
            raise RuntimeError("the embedding service is not running")
        if len(text) <= self.inline_chars:
            vector = self.embedder.embed([text])[0]
            self.cache.put(text, vector)
            return Embedded(vector.copy(), False, time.perf_counter() - t)
        fut = self._waiting.get(text)
        if fut is None:
            assert self._queue is not None  # made by `start`
            fut = asyncio.get_running_loop().create_future()
            self._waiting[text] = fut
            self._queue.put_nowait((text, fut))
        # shield: one caller giving up (client disconnect) must not cancel the shared result for the others.
        vector = await asyncio.shield(fut)
        return Embedded(vector, False, time.perf_counter() - t)

    async def _next_batch(self) -> list[tuple[str, asyncio.Future[F32]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            texts = [text for text, _ in batch]
            try:
                rows = await loop.run_in_executor(self._pool, self.embedder.embed, texts)
            except Exception as exc:  # the model failed: every waiter learns why, the service goes on
                for text, fut in batch:
                    self._waiting.pop(text, None)
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.batched_texts += len(texts)
            for (text, fut), row in zip(batch, rows, strict=True):
                self._waiting.pop(text, None)
                self.cache.put(text, row)
                if not fut.done():
                    fut.set_result(row.copy())  # a copy: the batch array is not kept alive by one row
