"""Polling each worker's own queue from its Prometheus `/metrics` (vLLM's gauges).

The gateway's in-flight count only knows its own requests; the worker knows everyone's, including other
gateway replicas' and requests queued behind a full KV cache. Replica choice and the policies' queueing
penalty read what is polled here (`Worker.running`, `.waiting`, `.kv_cache_usage`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.workers import Worker, WorkerRegistry

log = logging.getLogger("turnout.load")

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
# vLLM renamed its KV-cache gauge; either name is read.
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def parse_vllm_load(text: str) -> tuple[float | None, float | None, float | None]:
    """(running, waiting, kv-cache usage 0..1) summed over a worker's models; None for a gauge not present.
    Raises ValueError for text that is not Prometheus exposition format."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (RUNNING, WAITING, *KV_USAGE):
                totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    kv = next((totals[n] for n in KV_USAGE if n in totals), None)
    return totals.get(RUNNING), totals.get(WAITING), kv


class LoadMonitor:
    """Reads every worker's `/metrics` every `interval_s` (its own small client, like the health checks)."""

    def __init__(self, registry: WorkerRegistry, interval_s: float, timeout_s: float,
                 client: httpx.AsyncClient | None = None) -> None:
        self.registry = registry  # replaced on reload
        self.interval = interval_s
        self._timeout = timeout_s
        self._client = client or httpx.AsyncClient(
            timeout=timeout_s, limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            trust_env=False,
        )
        self._task: asyncio.Task[None] | None = None

    async def poll(self, worker: Worker) -> None:
        """Read one worker's load now. Never raises: a failure leaves the old reading to go stale."""
        if not worker.config.poll_load:
            return
        try:
            resp = await self._client.get(worker.config.resolved_metrics_url(), headers=worker.auth_headers,
                                          timeout=self._timeout)
            if resp.status_code != 200:
                raise ValueError(f"/metrics answered {resp.status_code}")
            running, waiting, kv = parse_vllm_load(resp.text)
        except Exception as exc:  # any failure to read is a missing reading, never an error for requests
            if worker.load_error is None:
                log.info("worker %s: no load reading (%s)", worker.name, type(exc).__name__)
            worker.load_error = f"{type(exc).__name__}: {exc}"[:200]
            return
        if running is None and waiting is None:
            worker.load_error = "no vllm queue gauges in /metrics"
            return
        worker.running, worker.waiting, worker.kv_cache_usage = running, waiting, kv
        worker.load_at, worker.load_error = time.monotonic(), None

    async def poll_all(self) -> None:
        """Read every worker concurrently."""
        await asyncio.gather(*(self.poll(w) for w in self.registry.workers.values()))

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_all()
            except Exception:  # a bug here must not stop load polling for good
                log.exception("load polling round failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Start polling (the first round runs at once)."""
        self._task = asyncio.create_task(self._run(), name="turnout-load")

    async def stop(self) -> None:
        """Stop polling and close the client."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._client.aclose()
