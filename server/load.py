"""Polling each worker's own queue from its Prometheus `/metrics` (vLLM's gauges).

The gateway's in-flight count only knows its own requests; the worker knows everyone's, including other
gateway replicas' and requests queued behind a full KV cache. Replica choice and the policies' queueing
penalty read what is polled here (`Worker.running`, `.waiting`, `.kv_cache_usage`).
"""

from __future__ import annotations

import logging
import time

from prometheus_client.parser import text_string_to_metric_families

from server.workers import Worker, WorkerPoller

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


class LoadMonitor(WorkerPoller):
    """Reads every worker's `/metrics` every `interval_s` (its own small client, like the health checks)."""

    task_name = "turnout-load"

    async def visit(self, worker: Worker) -> None:
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
