"""A real Prometheus scrapes a gateway serving real traffic (fake workers); what it stored must equal what the
client sent and the usage the workers returned, exactly. Every PromQL expression of the Grafana dashboard and of
the rules file is then run against it and must return data.

Traffic: non-streaming and streaming chat through a `fixed`, a `weighted` and a `knn` policy (static embedder,
with the weighted one as its shadow and a tiny budget), requests the worker fails (500) so that errors show,
feedback, and a config reload. A third worker points at a closed port, so `turnout_worker_up` has a 0.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam
from rich.console import Console

from routers.offline.commands import run_train
from testkit.procs import ManagedProcess, free_port, system_binary
from tests.conftest import Upstream, serve_gateway
from tests.integration.test_live_vs_offline import CHEAP, STRONG, two_model_table

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "turnout-rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "turnout.json"
PRICES = {"small": (0.1, 0.2), "big": (1.0, 3.0)}  # worker -> USD per 1M input, output tokens
ADMIN_KEY = "prometheus-test-admin-key-of-32-characters"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(fakes: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The gateway (a real process on a real port) and a Prometheus scraping it and both fakes every second."""
    tmp = tmp_path_factory.mktemp("prometheus")
    table = two_model_table(tmp)
    info = run_train(table, "knn", tmp / "artifact", "static", Console(file=io.StringIO()))
    ghost = free_port()  # nothing listens here: the worker is down
    config: dict[str, Any] = {
        "workers": [
            {"name": "small", "model": "fake-small", "base_url": fakes["fake-small"].base_url,
             "price": {"input_per_1m": PRICES["small"][0], "output_per_1m": PRICES["small"][1]}},
            {"name": "big", "model": "fake-big", "base_url": fakes["fake-big"].base_url,
             "price": {"input_per_1m": PRICES["big"][0], "output_per_1m": PRICES["big"][1]}},
            {"name": "ghost", "model": "ghost-model", "base_url": f"http://127.0.0.1:{ghost}/v1",
             "price": {"input_per_1m": 0.5, "output_per_1m": 0.5}},
        ],
        "policies": {
            "cheap": {"type": "fixed", "worker": "small"},
            "split": {"type": "weighted", "weights": {"small": 1, "big": 1}, "seed": 3},
            "smart": {"type": "knn", "artifact": info["artifact"], "models": {CHEAP: "small", STRONG: "big"},
                      "budget_usd_per_hour": 1e-6, "shadow": "split"},
        },
        "default_policy": "smart",
        "embedder": {"backend": "static"},
        "server": {"health_interval_s": 0.5, "load_interval_s": 0.5, "reference_model": "fake-big"},
    }
    proc, url = serve_gateway(config, tmp)
    proc.env = {**(proc.env or {}), "TURNOUT_ADMIN_KEY": ADMIN_KEY}
    prom_port = free_port()
    targets = [url.removeprefix("http://")] + [u.root.removeprefix("http://") for u in fakes.values()]
    shutil.copy(RULES, tmp / RULES.name)
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [RULES.name],
        "scrape_configs": [
            {"job_name": "turnout", "static_configs": [{"targets": targets[:1]}]},
            {"job_name": "vllm", "static_configs": [{"targets": targets[1:]}]},
        ],
    }))
    prom = ManagedProcess(
        [system_binary("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        ready_url=f"http://127.0.0.1:{prom_port}/-/ready", log_path=tmp / "prometheus.log", timeout_s=60,
    )
    with proc, prom:
        wait_for(lambda: sum(w["health"] == "up" for w in httpx.get(f"{url}/readyz").json()["workers"].values()) == 2,
                 "both fake workers up at the gateway")
        yield {"url": url, "prom": f"http://127.0.0.1:{prom_port}", "config_path": next(tmp.glob("gateway-*.yaml"))}


def wait_for(check: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def by(prom: str, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1]) for r in query(prom, expr)}


@pytest.fixture(scope="module")
def traffic(stack: dict[str, Any], fakes: dict[str, Upstream]) -> dict[str, Any]:
    """Send the traffic; return what the client saw: requests by (policy, worker, status), usage, cost."""
    for up in fakes.values():
        httpx.post(f"{up.root}/fake/mode", json={}, timeout=5).raise_for_status()
    url = stack["url"]
    # Prometheus's first scrape comes a few seconds after it is ready: traffic before it would show no increase.
    wait_for(lambda: bool(query(stack["prom"], 'up{job="turnout"} == 1')), "Prometheus's first scrape of the gateway")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    seen: Counter[tuple[str, str, str]] = Counter()
    tokens: dict[str, list[int]] = {"fake-small": [0, 0], "fake-big": [0, 0]}
    cost: dict[str, float] = {"fake-small": 0.0, "fake-big": 0.0}
    prompts = ["What is 17 * 23?", "Write a haiku about the sea.", "Explain TCP slow start.",
               "Summarise the causes of the First World War.", "hi", "Translate 'good morning' to French."]
    for i in range(30):
        model = ("auto", "turnout/split", "turnout/cheap")[i % 3]
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": prompts[i % len(prompts)]}]
        extra: dict[str, Any] = {"fake": {"status": 500}} if i % 10 == 9 else {}
        usage: CompletionUsage | None = None
        if i % 4 == 0:
            streamed = client.chat.completions.with_raw_response.create(
                model=model, messages=messages, max_tokens=5, stream=True,
                stream_options={"include_usage": True}, extra_body=extra)
            for chunk in streamed.parse():
                usage = chunk.usage or usage
            headers, status = streamed.headers, "ok"
        else:
            try:
                plain = client.chat.completions.with_raw_response.create(
                    model=model, messages=messages, max_tokens=5, extra_body=extra)
                usage, headers, status = plain.parse().usage, plain.headers, "ok"
            except openai.APIStatusError as err:
                headers, status = err.response.headers, "error"
        worker, policy = headers["x-turnout-model"], headers["x-turnout-policy"]
        served = {"small": "fake-small", "big": "fake-big"}[worker]
        if usage is not None:
            tokens[served][0] += usage.prompt_tokens
            tokens[served][1] += usage.completion_tokens
            price = PRICES[worker]
            cost[served] += (usage.prompt_tokens * price[0] + usage.completion_tokens * price[1]) / 1e6
        seen[(policy, worker, status)] += 1
        time.sleep(0.1)  # spread over a few scrapes, as traffic is, so rates see it rise
    # Feedback for one routed request, and one reload (same file: a valid config).
    routed = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    usage = routed.parse().usage
    assert usage is not None
    rw = routed.headers["x-turnout-model"]
    served = {"small": "fake-small", "big": "fake-big"}[rw]
    tokens[served][0] += usage.prompt_tokens
    tokens[served][1] += usage.completion_tokens
    cost[served] += (usage.prompt_tokens * PRICES[rw][0] + usage.completion_tokens * PRICES[rw][1]) / 1e6
    seen[("smart", rw, "ok")] += 1
    fb = httpx.post(f"{url}/v1/feedback", json={"request_id": routed.headers["x-turnout-request-id"], "score": 0.8})
    assert fb.status_code == 200, fb.text
    reload = httpx.post(f"{url}/admin/reload", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert reload.status_code == 200, reload.text
    return {"requests": seen, "tokens": tokens, "cost": cost}


def test_prometheus_stores_exactly_what_was_sent(stack: dict[str, Any], traffic: dict[str, Any]) -> None:
    prom = stack["prom"]
    sent = sum(traffic["requests"].values())
    # Scraped every second: wait until Prometheus has a sample taken after the last request.
    wait_for(lambda: by(prom, "sum(turnout_requests_total)").get((), 0) == sent, f"{sent} requests in Prometheus")
    # The feedback and then the reload came after the last request: a scrape may have come between any two.
    wait_for(lambda: by(prom, "sum(turnout_feedback_total)").get((), 0) == 1, "the feedback in Prometheus")
    wait_for(lambda: by(prom, 'sum(turnout_config_reloads_total{result="ok"})').get((), 0) == 1,
             "the reload in Prometheus")
    stored: Counter[tuple[str, str, str]] = Counter()
    for (policy, worker, status), n in by(prom, "sum by (policy, worker, status) (turnout_requests_total)",
                                          "policy", "worker", "status").items():
        stored[(policy, worker, "ok" if status == "ok" else "error")] += int(n)  # the label names the failure
    assert stored == traffic["requests"]
    assert any(status == "error" for _, _, status in stored), "the injected failures are counted as failures"
    prompt = by(prom, "sum by (model) (turnout_prompt_tokens_total)", "model")
    completion = by(prom, "sum by (model) (turnout_completion_tokens_total)", "model")
    for model, (pt, ct) in traffic["tokens"].items():
        assert prompt.get((model,), 0.0) == pt and completion.get((model,), 0.0) == ct, model
    cost = by(prom, "sum by (model) (turnout_cost_usd_total)", "model")
    for model, usd in traffic["cost"].items():
        # The same products summed in another order: equal to float rounding.
        assert cost.get((model,), 0.0) == pytest.approx(usd, rel=1e-12, abs=1e-15), model
    # Savings against fake-big: what the same tokens cost there, minus what they cost.
    big = PRICES["big"]
    reference = sum((pt * big[0] + ct * big[1]) / 1e6 for pt, ct in traffic["tokens"].values())
    savings = by(prom, "sum(turnout_savings_usd)")[()]
    assert savings == pytest.approx(reference - sum(traffic["cost"].values()), rel=1e-9)
    assert by(prom, "sum(turnout_feedback_total)")[()] == 1.0
    assert by(prom, 'sum(turnout_config_reloads_total{result="ok"})')[()] == 1.0
    up = by(prom, "turnout_worker_up", "worker")
    assert up == {("small",): 1.0, ("big",): 1.0, ("ghost",): 0.0}


def dashboard_exprs() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p["targets"]]


def rule_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(r.get("record") or r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


# A comparison against a constant at the end of an alert: its left side must return data (the alert itself
# fires only when the threshold is crossed).
THRESHOLD = re.compile(r"^(?P<lhs>.+?)\s*(>|<|==|!=|>=|<=)\s*[0-9.]+\s*$", re.S)


def test_every_dashboard_and_rule_expression_returns_data(stack: dict[str, Any], traffic: dict[str, Any]) -> None:
    prom = stack["prom"]
    wait_for(lambda: by(prom, "sum(turnout_requests_total)").get((), 0) == sum(traffic["requests"].values()),
             "the traffic in Prometheus")
    # Rates need two samples after the traffic, and the recording rules a few evaluations.
    time.sleep(3)
    empty = []
    for name, expr in [*dashboard_exprs(), *rule_exprs()]:
        expr = expr.replace("$__rate_interval", "1m")
        result = query(prom, expr)  # also proves the expression parses
        if not result and (m := THRESHOLD.match(expr.strip())):
            result = query(prom, m.group("lhs"))
        if not result:
            empty.append(f"{name}: {expr}")
    assert not empty, "expressions with no data:\n" + "\n".join(empty)
    rules = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
    bad = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r.get("health") != "ok"]
    assert not bad and sum(len(g["rules"]) for g in rules) == len(rule_exprs())
    firing = {a["labels"]["alertname"] for a in httpx.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]}
    # Pending or firing: the ghost worker is down, and the knn policy spends over its tiny budget.
    assert {"TurnoutWorkerDown", "TurnoutBudgetBurn"} <= firing, firing


def test_shipped_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = system_binary("promtool")
    for args in (["check", "config", str(REPO / "deploy" / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(RULES)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_is_well_formed() -> None:
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) and doc["uid"]
    for panel in doc["panels"]:
        assert panel["datasource"]["uid"] == "turnout-prometheus" and panel["targets"], panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]
    provisioned = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert provisioned["datasources"][0]["uid"] == "turnout-prometheus"
