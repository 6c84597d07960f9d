"""Learned routers on fixed synthetic embeddings (seeded): predictors, lambda, pacing, bandit, artifacts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from routers.artifacts import Artifact, ArtifactError, load_artifact, save_artifact
from routers.bandit import BanditRouter, LinUCB, Projection
from routers.base import RoutingOutcome, RoutingRequest
from routers.cost_aware import BudgetPacer, choose, lambda_for_target
from routers.from_artifact import router_from_artifact
from routers.learned import UtilityRouter
from routers.offline.dataset import RoutingData
from routers.offline.training import TrainOptions, policy_curve, train
from routers.predictors import KnnIndex, KnnPredictor, ProbePredictor

RNG = np.random.default_rng(0)
MODELS = ["cheap", "strong"]


def unit(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def two_topic_table(n: int = 400) -> tuple[RoutingData, npt.NDArray[np.float32]]:
    """Topic A prompts: both models succeed; topic B: only the strong one. The strong one costs 10x."""
    rng = np.random.default_rng(1)
    centers = unit(rng.normal(size=(2, 16)))
    topic = np.arange(n) % 2
    x = unit(centers[topic] + 0.15 * rng.normal(size=(n, 16)))
    scores = np.where(topic[:, None] == 0, [1.0, 1.0], [0.0, 1.0]).astype(np.float64)
    costs = np.tile([1e-4, 1e-3], (n, 1))
    data = RoutingData(prompts=[f"p{i}" for i in range(n)], models=MODELS, scores=scores, costs=costs,
                       tasks=np.array(["a" if t == 0 else "b" for t in topic]), splits=None,
                       prompt_ids=[str(i) for i in range(n)], data_hash="h", cost_source="table")
    return data, x


def test_knn_predicts_each_topic() -> None:
    data, x = two_topic_table()
    pred = KnnPredictor(KnnIndex(x[:300], data.scores[:300], data.costs[:300] if data.costs is not None else None),
                        k=10)
    q = pred.predict(x[300:])
    topic = np.arange(300, 400) % 2
    assert np.allclose(q[topic == 0], [1, 1]) and np.allclose(q[topic == 1], [0, 1])
    c = pred.predict_cost(x[300:])
    assert c is not None and np.allclose(c, [1e-4, 1e-3])


def test_knn_ignores_unknown_scores() -> None:
    x = unit(RNG.normal(size=(5, 4)))
    scores = np.array([[1, np.nan], [1, np.nan], [0, 0.5], [0, np.nan], [1, np.nan]])
    pred = KnnPredictor(KnnIndex(x, scores, None), k=5, weighting="uniform")
    q = pred.predict(x[:1])
    assert q[0, 0] == pytest.approx(0.6) and q[0, 1] == pytest.approx(0.5)


def test_probe_learns_soft_labels() -> None:
    data, x = two_topic_table()
    probe = ProbePredictor.fit(x, data.scores, c=10.0)
    q = probe.predict(x)
    topic = np.arange(len(x)) % 2
    assert q[topic == 0, 0].mean() > 0.9 and q[topic == 1, 0].mean() < 0.1
    assert q[:, 1].min() > 0.9  # the strong model is always right: a constant near 1


def test_choose_breaks_ties_toward_cheaper() -> None:
    q = np.array([[0.5, 0.5], [0.2, 0.9]])
    c = np.array([[0.1, 1.0], [0.1, 1.0]])
    assert choose(q, c, 0.0).tolist() == [0, 1]
    assert choose(q, c, 10.0).tolist() == [0, 0]


def test_lambda_targets_are_met() -> None:
    rng = np.random.default_rng(2)
    q = rng.uniform(size=(500, 3))
    c = np.tile([1.0, 2.0, 5.0], (500, 1)) * 1e-4
    for kind, value in (("max_cost", 2e-4), ("strong_share", 0.2), ("min_quality", 0.7)):
        lam = lambda_for_target(kind, value, q, c, 5e-4, strongest=2)  # type: ignore[arg-type]
        pick = choose(q, c / 5e-4, lam)
        rows = np.arange(500)
        if kind == "max_cost":
            assert c[rows, pick].mean() <= value + 1e-12
            assert c[rows, choose(q, c / 5e-4, lam * 0.9)].mean() > value  # and not more than needed
        elif kind == "strong_share":
            assert (pick == 2).mean() <= value + 1e-12
        else:
            assert q[rows, pick].mean() >= value - 1e-12
    assert lambda_for_target("max_cost", 1.0, q, c, 5e-4, 2) == 0.0  # already met at lambda 0


def test_budget_pacer_tracks_the_budget() -> None:
    now = [0.0]
    pacer = BudgetPacer(usd_per_hour=1.0, lam=0.01, window_s=60, clock=lambda: now[0])
    # One request a second; a higher lambda means a cheaper choice: cost/request = 1e-3 / (1 + 20 lambda).
    spent = []
    for _ in range(3600):
        now[0] += 1.0
        cost = 1e-3 / (1 + 20 * pacer.lam)
        pacer.record(cost)
        spent.append(cost)
    rate_last_10min = sum(spent[-600:]) / 600 * 3600
    assert rate_last_10min == pytest.approx(1.0, rel=0.15)


def test_bandit_learns_and_merges_by_addition() -> None:
    data, x = two_topic_table()
    proj = Projection.fit(x, 4)
    a, b = LinUCB(2, 5, alpha=0.1), LinUCB(2, 5, alpha=0.1)
    router = BanditRouter("bandit", MODELS, proj, a, cost_ref=1e-3, mean_costs=np.array([1e-4, 1e-3]), lam=0.5)
    for i in range(200):
        d = router.route(RoutingRequest(request_id=str(i), text="", candidates=tuple(MODELS), embedding=x[i]))
        router.observe(RoutingOutcome(request_id=str(i), chosen=d.chosen, ok=True,
                                      quality=float(data.scores[i, MODELS.index(d.chosen)])))
    picks = [router.route(RoutingRequest(request_id=f"t{i}", text="", candidates=tuple(MODELS),
                                         embedding=x[i])).chosen for i in range(300, 400)]
    topic = np.arange(300, 400) % 2
    assert np.mean([p == "cheap" for p, t in zip(picks, topic, strict=True) if t == 0]) > 0.8
    assert np.mean([p == "strong" for p, t in zip(picks, topic, strict=True) if t == 1]) > 0.8
    # Two replicas' deltas add up in a shared state.
    da, db, dn = a.pending_delta()
    assert dn.sum() == 200
    b.load(b.a + da, b.b + db, b.n + dn)
    assert np.allclose(b.theta, a.theta)
    assert a.pending_delta()[2].sum() == 0  # flushed


def test_unknown_feedback_teaches_nothing() -> None:
    _, x = two_topic_table()
    router = BanditRouter("b", MODELS, Projection.fit(x, 4), LinUCB(2, 5), cost_ref=1.0, mean_costs=np.zeros(2))
    router.observe(RoutingOutcome(request_id="never-routed", chosen="cheap", ok=True, quality=1.0))
    assert router.bandit.n.sum() == 0


@pytest.mark.parametrize("kind", ["knn", "cost_aware", "bandit"])
def test_train_save_load_route(kind: str, tmp_path: Path) -> None:
    data, x = two_topic_table()
    opts = TrainOptions(knn_k=(5, 20), knn_temperature=(0.05,), probe_c=(1.0,), knn_weights=(0.0, 1.0), bandit_dim=4,
                        bandit_lambda=0.5)
    fitted = train(kind, data, x, "test-embedder", opts)
    path = save_artifact(fitted.artifact, tmp_path / "art")
    art = load_artifact(path, embedder_id="test-embedder", models=MODELS)
    assert art.version == fitted.artifact.version and art.router == kind
    router = router_from_artifact("p", art, lam=0.5)
    d = router.route(RoutingRequest(request_id="r", text="", candidates=tuple(MODELS), embedding=x[1]))
    assert d.chosen == "strong" and d.version == art.version and len(d.ranking) == 2
    assert all(c.predicted_quality is not None and c.predicted_cost_usd is not None for c in d.ranking)
    d0 = router.route(RoutingRequest(request_id="r2", text="", candidates=tuple(MODELS), embedding=x[0]))
    assert d0.chosen == "cheap"
    assert d0.reason


def test_artifact_refusals(tmp_path: Path) -> None:
    art = Artifact("knn", {"embedder": "e1", "models": MODELS}, {"a": np.arange(3)})
    path = save_artifact(art, tmp_path / "a")
    with pytest.raises(ArtifactError, match="embedder 'e1'"):
        load_artifact(path, embedder_id="e2")
    with pytest.raises(ArtifactError, match="built for models"):
        load_artifact(path, models=["x", "y"])
    (path / "meta.json").write_text((path / "meta.json").read_text().replace('"e1"', '"e9"'))
    with pytest.raises(ArtifactError, match="do not match"):
        load_artifact(path)
    with pytest.raises(ArtifactError, match="not a Turnout artifact"):
        load_artifact(tmp_path / "missing")


def test_utility_router_respects_limits() -> None:
    data, x = two_topic_table()
    pred = KnnPredictor(KnnIndex(x, data.scores, data.costs), k=10)
    r = UtilityRouter("p", "knn", pred, MODELS, cost_ref=1e-3)
    hard = x[1]  # topic B: only the strong model succeeds
    assert r.route(RoutingRequest("a", "", tuple(MODELS), embedding=hard)).chosen == "strong"
    capped = r.route(RoutingRequest("b", "", tuple(MODELS), embedding=hard, max_cost_usd=5e-4))
    assert capped.chosen == "cheap" and "cost <=" in capped.reason
    only = r.route(RoutingRequest("c", "", ("cheap",), embedding=hard))
    assert only.chosen == "cheap" and len(only.ranking) == 1


def test_policy_curve_spans_cost_range() -> None:
    data, x = two_topic_table()
    q = KnnPredictor(KnnIndex(x, data.scores, data.costs), k=10).predict(x)
    assert data.costs is not None
    pts = policy_curve(q, data.costs, data.scores, data.costs, 1e-3)
    assert pts[0, 1] == pytest.approx(1.0)  # lambda 0: the strong model where needed
    assert pts[-1, 0] == pytest.approx(1e-4)  # the largest lambda: always cheap


def test_prompt_stats_and_their_scaling() -> None:
    from routers.textstats import STAT_NAMES, TextStats, prompt_stats

    raw = prompt_stats(["Hello World? 123\nfoo(x);", "é", ""])
    assert raw.shape == (3, len(STAT_NAMES))
    row = dict(zip(STAT_NAMES, raw[0], strict=True))
    assert row["digit_share"] == pytest.approx(3 / 24) and row["upper_share"] == pytest.approx(2 / 24)
    assert row["log_question_marks"] == pytest.approx(np.log(2)) and row["log_lines"] == pytest.approx(np.log(2))
    assert raw[1, STAT_NAMES.index("non_ascii_share")] == 1.0 and np.isfinite(raw).all()
    ts = TextStats.fit(np.vstack([raw[:2], raw[:2]]))
    assert (ts.std > 0).all()  # constant columns get unit spread, never a division by zero
    feats = ts.features(unit(RNG.normal(size=(3, 4))), raw)
    assert feats.shape == (3, 4 + len(STAT_NAMES) + 1)


def test_probe_learns_from_text_statistics_when_the_embedding_says_nothing() -> None:
    """Long prompts defeat the cheap model; every prompt has the same embedding, so only length can tell."""
    from routers.textstats import prompt_stats

    texts = ["short question" if i % 2 else "a long and winding multi-step problem " * 20 for i in range(200)]
    x = np.tile(unit(RNG.normal(size=(1, 8))), (200, 1))
    scores = np.array([[1.0, 1.0] if i % 2 else [0.0, 1.0] for i in range(200)])
    stats = prompt_stats(texts)
    probe = ProbePredictor.fit(x, scores, c=1.0, stats=stats)
    q = probe.predict(x, stats)
    assert q[0, 0] < 0.2 < 0.8 < q[1, 0]
    with pytest.raises(ValueError, match="text statistics"):
        probe.predict(x)
    plain = ProbePredictor.fit(x, scores, c=1.0)
    assert plain.predict(x)[0, 0] == pytest.approx(plain.predict(x)[1, 0])


def test_two_model_tables_without_costs_select_by_apgr() -> None:
    from routers.offline.training import selection_score

    rng = np.random.default_rng(4)
    scores = np.column_stack([np.ones(100), rng.integers(0, 2, 100)]).astype(np.float64)  # strong, weak
    gain = scores[:, 0] - scores[:, 1]
    good = np.column_stack([0.5 + 0.4 * gain, np.full(100, 0.5)])
    bad = np.column_stack([0.5 - 0.4 * gain, np.full(100, 0.5)])
    # A ranking by the true gain recovers most of the gap; the reversed ranking less than chance (0.5).
    assert selection_score(good, np.zeros_like(good), scores, None, 1.0) > 0.7
    assert selection_score(bad, np.zeros_like(bad), scores, None, 1.0) < 0.4
