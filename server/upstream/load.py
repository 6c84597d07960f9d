"""Polling each worker's own queue from its Prometheus `/metrics` (vLLM's gauges).

The gateway's in-flight count only knows its own requests; the worker knows everyone's, including other
gateway replicas' and requests queued behind a full KV cache. Replica choice and the policies' queueing
penalty read what is polled here (`Worker.running`, `.waiting`, `.kv_cache_usage`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client.parser import text_string_to_metric_families

from server.upstream.workers import Worker, WorkerPoller

log = logging.getLogger("turnout.load")

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
# vLLM renamed its KV-cache gauge; either name is read.
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


_GAUGES = (RUNNING, WAITING, *KV_USAGE)


def _wanted(line: str) -> bool:
    """A line of one of the queue gauges: a sample, or its `# HELP` / `# TYPE` comment."""
    line = line.lstrip()  # as the parser reads it
    if line.startswith("#"):
        parts = line.split(None, 3)
        return len(parts) >= 3 and parts[2] in _GAUGES
    return line.startswith(_GAUGES)


def parse_vllm_load(text: str) -> tuple[float | None, float | None, float | None]:
    """(running, waiting, kv-cache usage 0..1) summed over a worker's models; None for a gauge not present.
    Raises ValueError for a gauge line that is not Prometheus exposition format.

    Only the gauges' own lines reach the parser: vLLM's `/metrics` is about 600 lines (50 KB) of histograms,
    and parsing all of it cost 19 ms of the gateway's CPU per worker and second on a 2-core machine."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(filter(_wanted, text.splitlines())) + "\n"):
        for sample in family.samples:
            if sample.name in _GAUGES:
                totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    kv = next((totals[n] for n in KV_USAGE if n in totals), None)
    return totals.get(RUNNING), totals.get(WAITING), kv


class LoadMonitor(WorkerPoller):
    """Reads every worker's `/metrics` every `interval_s` (its own small client, like the health checks): once
    per metrics URL, since workers that are one server (one vLLM serving several model names, say) share its
    queue."""

    task_name = "turnout-load"

    async def visit_all(self) -> None:
        """Read every polled worker's load now, one request per metrics URL and credentials."""
        groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[Worker]] = {}
        for w in self.registry.workers.values():
            if w.config.poll_load:
                key = (w.config.resolved_metrics_url(), tuple(sorted(w.auth_headers.items())))
                groups.setdefault(key, []).append(w)
        await asyncio.gather(*(self._read(ws) for ws in groups.values()))

    async def visit(self, worker: Worker) -> None:
        """Read one worker's load now. Never raises: a failure leaves the old reading to go stale."""
        if worker.config.poll_load:
            await self._read([worker])

    async def _read(self, workers: list[Worker]) -> None:
        """One read of the first worker's metrics URL, recorded on every worker given (they share it)."""
        first = workers[0]
        try:
            resp = await self._client.get(first.config.resolved_metrics_url(), headers=first.auth_headers,
                                          timeout=self._timeout)
            if resp.status_code != 200:
                raise ValueError(f"/metrics answered {resp.status_code}")
            running, waiting, kv = parse_vllm_load(resp.text)
        except Exception as exc:  # any failure to read is a missing reading, never an error for requests
            for worker in workers:
                if worker.load_error is None:
                    log.info("worker %s: no load reading (%s)", worker.name, type(exc).__name__)
                worker.load_error = f"{type(exc).__name__}: {exc}"[:200]
            return
        now = time.monotonic()
        own = sum(w.in_flight for w in workers)  # ours on this server as the reading came in (see Worker.load)
        peers = tuple(workers)
        for worker in workers:
            if running is None and waiting is None:
                worker.load_error = "no vllm queue gauges in /metrics"
                continue
            worker.running, worker.waiting, worker.kv_cache_usage = running, waiting, kv
            worker.load_at, worker.load_error = now, None
            worker.own_at_load, worker.load_peers = own, peers
