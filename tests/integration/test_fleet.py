"""The fleet workflow end to end on two real vLLM CPU models of different sizes (SmolLM2-135M-Instruct and
Gemma 3 270M), with the `turnout` commands as a user runs them:

- `collect` on 30 bundled prompts, interrupted by SIGINT half way and run again: the workers' own counters
  (vLLM's finished requests and tokens) equal what the run recorded, so no call was lost or repeated, and the
  recorded costs equal the workers' token counts at the configured prices;
- `grade` with the reference graders, and with one of the workers as the judge (the mechanics, not wisdom:
  a small base model's verdicts are mostly unreadable, which must come out as unknown, never 0);
- `train` and `eval` on the graded table; then a gateway serving the trained policy, whose decisions on the
  run's prompts (`POST /v1/route`, and chat requests) equal the decisions `eval` makes with the same artifact.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pandas as pd
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from loadtest.fleet_demo import FLEET, fleet, fleet_config
from routers.artifacts import load_artifact
from routers.cost_aware import choose
from routers.from_artifact import router_from_artifact
from routers.learned import UtilityRouter
from routers.offline.commands import load_and_embed
from routers.textstats import prompt_stats
from server.fleet.run import RunDir
from testkit.engines import PY_ENV, gateway_process, has_avx2, vllm_ready
from testkit.procs import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]
PROMPTS, MAX_TOKENS = 30, 8
TASKS = "natural_qa,trivia_qa,gsm8k"


@dataclass(frozen=True)
class Fleet:
    """The running workers and the config naming them."""

    urls: dict[str, str]  # worker name -> base URL
    config: Path
    work: Path


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if not has_avx2():
        pytest.skip("the vLLM CPU build needs AVX2, which this CPU lacks")
    for model in ("gemma3-270m", "smollm2-135m"):
        if not vllm_ready(model):
            pytest.fail(f"the vLLM model {model} is not set up: run `make vllm` (make test does it first)")
    work = tmp_path_factory.mktemp("fleet")
    with fleet(work) as urls:
        cfg = work / "fleet.yaml"
        cfg.write_text(yaml.safe_dump(fleet_config(urls)))
        yield Fleet(urls, cfg, work)


def turnout(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=cwd, env={**PY_ENV, "COLUMNS": "150"},
                          capture_output=True, text=True, check=False, timeout=900)


def counters(url: str) -> dict[str, float]:
    """A vLLM worker's own totals: finished requests, prompt and generated tokens."""
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
    out = {"requests": 0.0, "prompt_tokens": 0.0, "generation_tokens": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:request_success_total":
                out["requests"] += s.value
            elif s.name == "vllm:prompt_tokens_total":
                out["prompt_tokens"] += s.value
            elif s.name == "vllm:generation_tokens_total":
                out["generation_tokens"] += s.value
    return out


def collect_args(f: Fleet) -> list[str]:
    return ["collect", "--config", str(f.config), "--prompts", "bundled:llmrouter", "--tasks", TASKS,
            "--sample", str(PROMPTS), "--max-tokens", str(MAX_TOKENS), "--concurrency", "2",
            "--out", str(f.work / "run")]


@pytest.fixture(scope="module")
def collected(two_models: Fleet) -> RunDir:
    """The run, collected in two halves: SIGINT once half the calls are recorded, then the same command again."""
    f = two_models
    before = {name: counters(url) for name, url in f.urls.items()}
    proc = subprocess.Popen([sys.executable, "-m", "server", *collect_args(f)], cwd=f.work, env={**PY_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answers = f.work / "run" / "answers.jsonl"
    deadline = time.monotonic() + 600
    while not (answers.is_file() and len(answers.read_text().splitlines()) >= PROMPTS):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "collect made no progress"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    first = list(RunDir(f.work / "run").answers())
    assert PROMPTS <= len(first) < 2 * PROMPTS, "stopped half way"
    seen = {name: counters(url) for name, url in f.urls.items()}
    assert sum(seen[n]["requests"] - before[n]["requests"] for n in f.urls) == len(first), "nothing lost in flight"
    second = turnout(*collect_args(f), cwd=f.work)
    assert second.returncode == 0, second.stdout + second.stderr
    after = {name: counters(url) for name, url in f.urls.items()}
    run = RunDir(f.work / "run")
    answers_all = list(run.answers())
    assert len(answers_all) == 2 * PROMPTS and all(a.ok for a in answers_all)
    for name, (served, _, (p_in, p_out)) in FLEET.items():
        mine = [a for a in answers_all if a.model == served]
        assert after[name]["requests"] - before[name]["requests"] == PROMPTS, f"{name}: no call repeated"
        tokens_in = after[name]["prompt_tokens"] - before[name]["prompt_tokens"]
        tokens_out = after[name]["generation_tokens"] - before[name]["generation_tokens"]
        assert sum(a.prompt_tokens or 0 for a in mine) == tokens_in
        assert sum(a.completion_tokens or 0 for a in mine) == tokens_out
        assert sum(a.cost_usd or 0.0 for a in mine) == pytest.approx((tokens_in * p_in + tokens_out * p_out) / 1e6,
                                                                     rel=1e-9)
        assert all(a.logprob_mean is not None and a.ttft_s is not None for a in mine), "logprobs and TTFT kept"
    return run


def test_grading_with_references_and_with_a_judge(two_models: Fleet, collected: RunDir) -> None:
    f = two_models
    ref = turnout("grade", str(collected.path), "--no-keep-split", "--out", str(f.work / "ref.parquet"), cwd=f.work)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    df = pd.read_parquet(f.work / "ref.parquet")
    assert len(df) == PROMPTS and "split" not in df.columns
    served = [s for s, _, _ in FLEET.values()]
    for s in served:
        assert df[f"score__{s}"].between(0, 1).all(), "every answer here has a reference grader"
        assert df[f"cost_usd__{s}"].gt(0).all() and df[f"logprob_mean__{s}"].lt(0).all()
    before = counters(f.urls["big"])
    # No retries here (each is a call to a one-core worker); the retry rule itself is tested on the fake worker.
    judged = turnout("grade", str(collected.path), "--grader", "judge", "--config", str(f.config), "--judge",
                     "gemma3-270m", "--retries", "0", "--out", str(f.work / "judged.parquet"), cwd=f.work)
    assert judged.returncode == 0, judged.stdout + judged.stderr
    calls = counters(f.urls["big"])["requests"] - before["requests"]
    assert calls == 2 * PROMPTS, "one judge call per answer"
    verdicts = [json.loads(line) for line in next(collected.path.glob("judge-*.jsonl")).read_text().splitlines()]
    assert len(verdicts) == 2 * PROMPTS and sum(v["attempts"] for v in verdicts) == calls
    scores = pd.read_parquet(f.work / "judged.parquet")[[f"score__{s}" for s in served]].to_numpy()
    unreadable = sum(v["score"] is None for v in verdicts)
    assert int(np.isnan(scores).sum()) == unreadable, "an unreadable verdict is unknown, never 0"
    assert "unreadable judge verdicts" in judged.stdout and "judge cost $" in judged.stdout


def test_the_trained_policy_decides_live_as_eval_does(two_models: Fleet, collected: RunDir) -> None:
    f = two_models
    graded = f.work / "graded.parquet"
    assert turnout("grade", str(collected.path), "--no-keep-split", "--out", str(graded), cwd=f.work).returncode == 0
    # Models this small answer these questions wrong nearly always, so every decision would be the cheap model's
    # and agree trivially. Scores by task (the big model wins one task) give the policy something to
    # learn, so the comparison below covers decisions for both models; costs and prompts stay as collected.
    # (The big model is given the gsm8k questions.)
    table = f.work / "table.parquet"
    df = pd.read_parquet(graded)
    big_wins = df["task"] == "gsm8k"
    df["score__gemma3-270m"] = np.where(big_wins, 1.0, 0.0)
    df["score__smollm2-135m"] = np.where(big_wins, 0.0, 1.0)
    df.to_parquet(table, index=False)
    trained = turnout("train", "--data", str(table), "--router", "cost_aware", "--out", str(f.work / "art"),
                      cwd=f.work)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    evaluated = turnout("eval", "--data", str(table), "--router", "cost_aware", "--folds", "3", "--json",
                        str(f.work / "eval.json"), cwd=f.work)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert json.loads((f.work / "eval.json").read_text())
    # eval's decisions with the trained artifact: the table embedded as a whole, scored, the argmax rule at lambda 0.
    data, x, embedder = load_and_embed(table, "static", Console(file=io.StringIO()))  # train's default
    router = router_from_artifact("eval", load_artifact(f.work / "art", embedder_id=embedder.id))
    assert isinstance(router, UtilityRouter)
    q, c = router.scores(x, prompt_stats(data.prompts))
    offline = [data.models[j] for j in choose(q, c / router.cost_ref, 0.0)]
    assert set(offline) == {"gemma3-270m", "smollm2-135m"}, "decisions for both models are compared"
    promoted = turnout("promote", "--config", str(f.config), "--artifact", str(f.work / "art"), "--name", "routed",
                       "--lambda", "0", "--default", "--out", str(f.work / "routed.yaml"), cwd=f.work)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    port = free_port()
    with gateway_process(f.work / "routed.yaml", port, f.work / "gateway.log"):
        url = f"http://127.0.0.1:{port}"
        wait_all_up(url)
        live = [httpx.post(f"{url}/v1/route", json={"model": "auto", "messages": [{"role": "user", "content": p}]},
                           timeout=30).json()["model"] for p in data.prompts]
        assert live == offline, [(i, a, b) for i, (a, b) in enumerate(zip(live, offline, strict=True)) if a != b]
        chat = openai.OpenAI(base_url=f"{url}/v1", api_key="t", max_retries=0, timeout=120)
        for p, want in list(zip(data.prompts, offline, strict=True))[:4]:
            raw = chat.chat.completions.with_raw_response.create(model="auto", max_tokens=4,
                                                                 messages=[{"role": "user", "content": p}])
            assert raw.parse().model == want


def wait_all_up(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        state: dict[str, Any] = httpx.get(f"{url}/readyz", timeout=5).json()
        if all(w["health"] == "up" for w in state["workers"].values()):
            return
        assert time.monotonic() < deadline, state
        time.sleep(0.2)

