"""Reading samples out of Prometheus text exposition (the gateway's and vLLM's /metrics)."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from testkit.engines import OPS_HEADERS


def sample_sum(metrics_url: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
    text = httpx.get(metrics_url, headers=OPS_HEADERS, timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
