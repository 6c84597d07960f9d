"""Offline metrics on hand-computed cases: hulls, AIQ, oracle/best/random, RouteLLM's PGR family, plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from routers.offline.evaluation import (
    aiq,
    apgr,
    best_single,
    cost_to_quality,
    cpt,
    curve_metrics,
    hull,
    oracle_choice,
    pgr_at_share,
    pgr_curve,
    plot_curves,
    plot_pgr,
    policy_point,
    quality_at_cost,
    random_baseline,
)

HULL = [[1.0, 0.5], [2.0, 0.7], [4.0, 0.9]]
POINTS = np.array(
    [
        [4.0, 0.9],
        [2.0, 0.6],  # same cost as a better point
        [3.0, 0.65],  # costs more than (2, 0.7) for less quality
        [1.5, 0.55],  # under the chord (1, 0.5)-(2, 0.7), which gives 0.6 there
        [1.0, 0.5],
        [3.0, 0.8],  # exactly on the chord (2, 0.7)-(4, 0.9)
        [2.0, 0.7],
        [5.0, 0.9],  # costs more for no more quality
        [np.nan, 0.99],  # not a measured point
    ]
)


def test_hull_drops_dominated_under_chord_and_collinear_points() -> None:
    np.testing.assert_allclose(hull(POINTS), HULL)
    np.testing.assert_allclose(hull([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]), [[0.1, 0.1], [0.3, 0.3]])
    np.testing.assert_allclose(hull([[2.0, 0.4]]), [[2.0, 0.4]])
    with pytest.raises(ValueError):
        hull(np.empty((0, 2)))


def test_quality_at_cost_and_cost_to_quality_interpolate() -> None:
    assert quality_at_cost(HULL, 0.5) is None
    assert quality_at_cost(HULL, 1.0) == pytest.approx(0.5)
    assert quality_at_cost(HULL, 1.5) == pytest.approx(0.6)
    assert quality_at_cost(HULL, 3.0) == pytest.approx(0.8)
    assert quality_at_cost(HULL, 10.0) == pytest.approx(0.9)  # flat right of the last vertex
    assert cost_to_quality(HULL, 0.4) == pytest.approx(1.0)
    assert cost_to_quality(HULL, 0.6) == pytest.approx(1.5)
    assert cost_to_quality(HULL, 0.8) == pytest.approx(3.0)
    assert cost_to_quality(HULL, 0.9) == pytest.approx(4.0)
    assert cost_to_quality(HULL, 0.95) is None


def test_aiq_flat_line_and_trapezoids() -> None:
    assert aiq([[0.5, 0.7]], 2.0, left="flat") == pytest.approx(0.7)
    assert aiq([[0.5, 0.7]], 2.0) == pytest.approx(0.7 * 1.5 / 2.0)  # zero left of the first vertex
    assert aiq([[0.0, 0.0], [1.0, 1.0]], 2.0) == pytest.approx(0.75)
    # (0.5+0.7)/2 * 1 + (0.7+0.9)/2 * 2 = 2.2 over [1, 4]; plus 0.5 * 1 on [0, 1] when flat.
    assert aiq(HULL, 4.0) == pytest.approx(2.2 / 4)
    assert aiq(HULL, 4.0, left="flat") == pytest.approx(2.7 / 4)
    assert aiq(HULL, 3.0) == pytest.approx((0.6 + 0.75) / 3)  # cut at max_cost
    assert aiq(HULL, 8.0) == pytest.approx((2.2 + 0.9 * 4) / 8)  # extended flat to max_cost
    with pytest.raises(ValueError):
        aiq(HULL, 0.0)


def test_curve_metrics() -> None:
    m = curve_metrics(POINTS, best=(0.7, 3.0), oracle_quality=0.95, max_cost=4.0)
    assert m["aiq"] == pytest.approx(0.55)
    assert m["quality_at_best_single_cost"] == pytest.approx(0.8)
    assert m["cost_to_best_single_quality"] == pytest.approx(2.0 / 3.0)
    assert m["oracle_gap_share"] == pytest.approx(0.4)
    np.testing.assert_allclose(m["curve"], HULL)
    cheap = curve_metrics(POINTS, best=(0.95, 0.5), oracle_quality=0.95, max_cost=4.0)
    assert cheap["quality_at_best_single_cost"] is None and cheap["oracle_gap_share"] is None
    assert cheap["cost_to_best_single_quality"] is None


SCORES = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.5, 0.2, np.nan], [np.nan, np.nan, np.nan]])
COSTS = np.array([[3.0, 1.0, 2.0], [1.0, 2.0, 1.5], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])


def test_oracle_choice_breaks_ties_by_cost_then_order() -> None:
    assert oracle_choice(SCORES, COSTS)[:3].tolist() == [1, 2, 0]
    assert oracle_choice(SCORES)[:3].tolist() == [0, 1, 0]
    assert oracle_choice(SCORES, order=[2, 1, 0])[:3].tolist() == [1, 2, 0]
    with pytest.raises(ValueError):
        oracle_choice(SCORES, order=[0, 0, 1])
    cost, quality = policy_point(oracle_choice(SCORES, COSTS), SCORES, COSTS)
    assert quality == pytest.approx(2.5 / 3) and cost == pytest.approx(3.5 / 3)  # the all-NaN row is left out


def test_best_single_random_and_nan_as_zero() -> None:
    model, quality, cost = best_single(SCORES, COSTS)
    assert model == 1 and quality == pytest.approx(2.2 / 3) and cost == pytest.approx(4.0 / 3)
    model, quality, cost = best_single(SCORES, None)
    assert model == 1 and quality == pytest.approx(2.2 / 3) and cost is None
    q, c = random_baseline(SCORES, COSTS)
    assert q == pytest.approx(4.7 / 9) and c == pytest.approx(13.5 / 9)
    assert random_baseline(SCORES, None)[1] is None
    cost_none, quality = policy_point(np.array([2, 2, 2, 2]), SCORES, None)
    assert cost_none is None and quality == pytest.approx(1 / 3)  # a chosen NaN score counts as 0
    tie = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert best_single(tie, np.array([[2.0, 1.0], [2.0, 1.0]]))[0] == 1  # equal quality: cheaper wins


def pair() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """100 prompts: 20 only the strong model gets right, 70 both, 10 neither (q_strong 0.9, q_weak 0.7)."""
    q_strong = np.array([1.0] * 90 + [0.0] * 10)
    q_weak = np.array([0.0] * 20 + [1.0] * 70 + [0.0] * 10)
    return q_strong - q_weak, q_strong, q_weak  # a perfect router's score


def test_perfect_router_follows_the_optimal_curve() -> None:
    score, qs, qw = pair()
    shares, pgr = pgr_curve(score, qs, qw)
    assert shares[0] == 0.0 and shares[-1] == 1.0 and pgr[0] == 0.0 and pgr[-1] == pytest.approx(1.0)
    # Points (0, 0), (0.2, 1), ..., (1, 1): the optimum min(share / 0.2, 1) has area 0.1 + 0.8.
    assert apgr(score, qs, qw) == pytest.approx(0.9)
    assert cpt(0.5, score, qs, qw) == pytest.approx(0.1)
    assert cpt(1.0, score, qs, qw) == pytest.approx(0.2)
    assert cpt(0.0, score, qs, qw) == 0.0
    assert cpt(1.2, score, qs, qw) is None
    assert pgr_at_share(0.1, score, qs, qw) == pytest.approx(0.5)
    assert pgr_at_share(0.5, score, qs, qw) == pytest.approx(1.0)


def test_ties_in_the_router_score_are_deterministic() -> None:
    _, qs, qw = pair()
    flat = np.zeros(100)
    shares, _ = pgr_curve(flat, qs, qw)  # every edge ties: all strong (>=) or none (> the max)
    assert set(shares.tolist()) == {0.0, 1.0}
    assert apgr(flat, qs, qw) == pytest.approx(0.5)
    assert pgr_at_share(0.2, flat, qs, qw) == pytest.approx(1.0)  # ties taken in row order: rows 0..19


def test_random_router_apgr_is_about_half() -> None:
    rng = np.random.default_rng(7)
    n = 20_000
    qs = (rng.random(n) < 0.8).astype(float)
    qw = (rng.random(n) < 0.6).astype(float)
    assert apgr(rng.random(n), qs, qw) == pytest.approx(0.5, abs=0.03)
    assert cpt(0.5, rng.random(n), qs, qw) == pytest.approx(0.5, abs=0.06)


def test_pgr_rejects_equal_models() -> None:
    with pytest.raises(ValueError, match="same mean"):
        apgr(np.arange(4.0), np.ones(4), np.ones(4))


def test_plots_are_written(tmp_path: Path) -> None:
    curves = {"knn": hull(POINTS), "cost-aware": np.array([[1.5, 0.6], [3.0, 0.85]])}
    singles = {"org/small": (1.0, 0.5), "big.1": (4.0, 0.9)}
    plot_curves(tmp_path / "c.png", curves, singles, (1.2, 0.97), "big.1", "test table")
    score, qs, qw = pair()
    plot_pgr(tmp_path / "p.png", {"perfect": pgr_curve(score, qs, qw)}, "pair")
    for name in ("c.png", "p.png"):
        raw = (tmp_path / name).read_bytes()
        assert raw.startswith(b"\x89PNG") and len(raw) > 1000


def test_two_models_of_equal_mean_quality_have_no_pgr_but_a_report() -> None:
    """A fleet whose two models score the same on the table (small models on hard questions) is a finding:
    eval reports PGR as undefined instead of failing."""
    from routers.offline.report import _two_model

    q = np.array([[0.2, 0.4], [0.6, 0.1], [0.5, 0.5]])
    scores = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    out = _two_model(["a", "b"], 0, q, scores)
    assert out["apgr"] is None and out["pgr_curve"] is None and "undefined" in out["note"]
