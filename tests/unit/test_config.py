"""Config: the documented shape is accepted; bad configs are rejected with every problem listed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from server.cli import app
from server.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
ISSUE_EXAMPLE = """
workers:
  - name: small
    model: gemma3-270m
    base_url: http://127.0.0.1:8091/v1
    price: {input_per_1m: 0.10, output_per_1m: 0.20}
policies:
  cheap: {type: fixed, worker: small}
default_policy: cheap
"""


def test_documented_shape_is_accepted() -> None:
    cfg = parse_config(yaml.safe_load(ISSUE_EXAMPLE))
    assert cfg.workers[0].price.cost_usd(1_000_000, 1_000_000) == pytest.approx(0.30)
    assert cfg.worker("small").resolved_health_url() == "http://127.0.0.1:8091/v1/models"
    assert cfg.default_policy == "cheap"


@pytest.mark.parametrize("path", sorted((REPO / "deploy" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    load_config(path)


def test_every_problem_is_listed_at_once() -> None:
    raw = {
        "workers": [
            {"name": "small", "model": "m", "base_url": "http://x:1/v1", "price": {"input_per_1m": -1}},
            {"name": "small", "model": "m", "base_url": "ftp://nope"},
        ],
        "policies": {"cheap": {"type": "fixed", "worker": "big"}, "odd": {"type": "nope"}},
        "default_policy": "missing",
        "surprise": 1,
    }
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    text = "\n".join(exc.value.problems)
    for expected in ["workers[0].price.input_per_1m", "workers[1].base_url", "policies.odd",
                     "surprise: Extra inputs are not permitted", "name 'small' is used by 2 workers",
                     "unknown worker or model 'big'", "default_policy: unknown policy 'missing'",
                     "replicas of model 'm' have different prices"]:
        assert expected in text, f"missing {expected!r} in:\n{text}"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"workers": []}, "workers: List should have at least 1 item"),
        ({}, "workers: Field required"),
        ([1, 2], "expected a mapping"),
        ({"workers": [{"name": "a b", "model": "m", "base_url": "http://x/v1"}]}, "workers[0].name"),
        ({"workers": [{"name": "a", "model": "m", "base_url": "http://x/v1"}],
          "policies": {"w": {"type": "weighted", "weights": {"a": 0}}}}, "weights must not all be zero"),
        ({"workers": [{"name": "a", "model": "m", "base_url": "http://x/v1"}],
          "policies": {"a": {"type": "fixed", "worker": "a"}}}, "may not share its name"),
        ({"workers": [{"name": "a", "model": "m", "base_url": "http://x/v1", "api_key": "sk-secret"}]},
         "workers[0].api_key: Extra inputs are not permitted"),
        ({"workers": [{"name": "a", "model": "m", "base_url": "http://127.0.0.1:99999/v1"}]}, "out of range"),
        ({"workers": [{"name": "a", "model": "m", "base_url": "http://h:port/v1"}]}, "workers[0].base_url"),
        ({"workers": [{"name": "a", "model": "m", "base_url": "http://x/v1", "health_url": "http://[::1/h"}]},
         "workers[0].health_url"),
        ({"workers": [{"name": "auto", "model": "m", "base_url": "http://x/v1"}]}, "'auto' is reserved"),
        ({"workers": [{"name": "a", "model": "turnout/x", "base_url": "http://x/v1"}]}, "is reserved"),
        ({"workers": [{"name": "m3", "model": "m4", "base_url": "http://x/v1"},
                      {"name": "b", "model": "m3", "base_url": "http://x/v1"}]}, "would be ambiguous"),
        ({"workers": [{"name": "a", "model": "m", "base_url": "http://x/v1", "price": {"input_per_1m": ".inf"}}]},
         "workers[0].price.input_per_1m"),
        ({"workers": [{"name": "a", "model": "m", "base_url": "http://x/v1"}],
          "policies": {"w": {"type": "weighted", "weights": {"a": float("inf")}}}}, "policies.w.weights.a"),
        ({"workers": [{"name": "a", "model": "m", "base_url": "http://x/v1"}],
          "policies": {"w": {"type": "weighted", "weights": {"a": 1}, "seed": -1}}}, "policies.w.seed"),
        ({"workers": [{"name": "a", "model": "m", "base_url": "http://x/v1"}],
          "policies": {"fixed": {"type": "fixed", "worker": "a", "bogus": 1}}}, "policies.fixed.bogus"),
    ],
)
def test_rejections(raw: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert any(fragment in p for p in exc.value.problems), exc.value.problems


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(ISSUE_EXAMPLE)
    bad = tmp_path / "bad.yaml"
    bad.write_text(ISSUE_EXAMPLE.replace("worker: small", "worker: ghost").replace("0.10", "-1"))
    runner = CliRunner()
    ok = runner.invoke(app, ["check-config", str(good)])
    assert ok.exit_code == 0 and "ok" in ok.output
    res = runner.invoke(app, ["check-config", str(bad)])
    assert res.exit_code == 1
    assert "2 problem(s)" in res.output
    assert "ghost" in res.output and "input_per_1m" in res.output


def test_replica_prices_compare_with_defaults_filled_in() -> None:
    w = {"model": "m", "base_url": "http://x/v1"}
    cfg = parse_config({"workers": [{**w, "name": "a", "price": {}}, {**w, "name": "b"},
                                    {**w, "name": "c", "price": {"input_per_1m": 0}}]})
    assert len(cfg.workers) == 3


def test_the_documented_config_is_valid() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    section = text[text.index("## The whole file"):]
    snippet = section[section.index("```yaml") + len("```yaml"):]
    snippet = snippet[:snippet.index("```")]
    cfg = parse_config(yaml.safe_load(snippet))
    assert cfg.upstream.keepalive_expiry_s == 4 and cfg.server.health_failures_to_down == 2


def test_embedder_backends_and_their_batching_wait() -> None:
    raw = yaml.safe_load(ISSUE_EXAMPLE)
    static = parse_config(raw).embedder
    assert static.spec() == "static" and static.wait_ms() == 0.0, "the default; no wait where embedding costs less"
    onnx = parse_config({**raw, "embedder": {"backend": "onnx"}}).embedder
    assert onnx.wait_ms() == 2.0, "a model batches concurrent misses by default"
    assert parse_config({**raw, "embedder": {"backend": "static", "max_wait_ms": 3}}).embedder.wait_ms() == 3.0
    with pytest.raises(ConfigError, match=r"embedder\.backend"):
        parse_config({**raw, "embedder": {"backend": "word2vec"}})


def test_removed_upstream_settings_are_refused_by_name() -> None:
    raw = yaml.safe_load(ISSUE_EXAMPLE)
    with pytest.raises(ConfigError) as info:
        parse_config({**raw, "upstream": {"write_timeout_s": 30, "max_keepalive_connections": 200}})
    assert "upstream.write_timeout_s" in str(info.value) and "upstream.max_keepalive_connections" in str(info.value)


def test_reference_model_defaults_to_the_dearest_and_must_exist() -> None:
    raw = yaml.safe_load(ISSUE_EXAMPLE)
    raw["workers"].append({"name": "big", "model": "big-lm", "base_url": "http://127.0.0.1:8092/v1",
                           "price": {"input_per_1m": 1.0, "output_per_1m": 2.0}})
    model, price = parse_config(raw).reference
    assert model == "big-lm" and price.cost_usd(1_000_000, 0) == 1.0
    raw["server"] = {"reference_model": "gemma3-270m"}
    assert parse_config(raw).reference[0] == "gemma3-270m"
    raw["server"] = {"reference_model": "gpt-9", "max_fallbacks": -1}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    assert "server.reference_model: 'gpt-9' is no worker's model" in text and "server.max_fallbacks" in text
