"""The prefill study's adoption rules (loadtest/prefill/report.py) on made-up figures: prefill features are adopted
only when they close half again as much of the oracle gap as MiniLM on both tables without lowering APGR; the
multilingual embedder only when it matches MiniLM on English and is clearly better on Chinese."""

from __future__ import annotations

from typing import Any

from loadtest.prefill.report import decision, multilingual, render

PICK = "gemma3-270m:1:mean"


def res(gap: float | None = None, q0: float = 0.5, gap0: float = 0.1, apgr: float | None = None, aiq: float = 0.5,
        by_group: dict[str, Any] | None = None) -> dict[str, Any]:
    r = {"oracle_gap_share": gap, "quality_at_lambda0": q0, "oracle_gap_share_at_lambda0": gap0, "apgr": apgr,
         "aiq": aiq, "cv_score_on_training_rows": 0.5, "quality_at_best_single_cost": 0.6,
         "cost_to_best_single_quality": 0.5, "cpt50": 0.3, "cpt80": 0.6}
    out: dict[str, Any] = {"rows": 100, "best_single": {"model": "m", "quality": 0.5, "cost": 1e-4},
                           "oracle": {"quality": 0.7, "cost": 1e-4}, "routers": {"knn": r, "cost_aware": r}}
    if by_group:
        out["by_group"] = by_group
    return out


def report(lr_gap: float, ood_gap: float, apgr: float, e5: dict[str, Any] | None = None) -> dict[str, Any]:
    def ev(groups: dict[str, Any]) -> dict[str, Any]:
        return {"groups": groups, "sample": None}

    zh = {"Chinese (cmmlu, ceval)": res(gap0=0.05), "the rest": res(q0=0.5)}
    lr = {"minilm": res(gap=0.14), PICK: res(gap=lr_gap)}
    ood = {"minilm": res(gap0=0.1, by_group=zh), PICK: res(gap0=ood_gap)}
    test = {"minilm": res(by_group=zh), PICK: res()}
    if e5 is not None:
        lr["e5"] = res(gap=0.14, aiq=e5["aiq"])
        for split in (ood, test):
            split["e5"] = res(by_group={"Chinese (cmmlu, ceval)": res(gap0=e5["zh_gap"]),
                                        "the rest": res(q0=e5["q0"])})
    return {"evaluations": {
        "llmrouter_9model test": ev({"all": lr}),
        "routerdc_7model test": ev({"all": test}),
        "routerdc_7model ood_test": ev({"all": ood}),
        "routellm_2model 5-fold": ev({"gsm8k": {"minilm": res(apgr=0.6), PICK: res(apgr=apgr)}})},
        "layers": {"gemma3-270m": [4, 9, 18]}, "chosen_by_cv": {"gemma3-270m": PICK}, "prompts": 10,
        "feature_cost": {}, "embedding_cpu_ms_per_prompt": {}}


def test_prefill_features_are_adopted_only_past_half_again_on_both_tables() -> None:
    assert decision(report(0.21, 0.15, 0.6))[0]
    assert not decision(report(0.20, 0.15, 0.6))[0], "14% -> 20% is less than half again"
    assert not decision(report(0.30, 0.14, 0.6))[0], "routerdc ood_test must move too"
    assert not decision(report(0.30, 0.30, 0.55))[0], "a lower APGR vetoes"
    assert "Rule met" in render(report(0.21, 0.15, 0.6))


def test_the_multilingual_embedder_needs_english_parity_and_a_clear_chinese_gain() -> None:
    assert multilingual(report(0.1, 0.1, 0.6, e5={"aiq": 0.495, "q0": 0.495, "zh_gap": 0.11}))[0]
    assert not multilingual(report(0.1, 0.1, 0.6, e5={"aiq": 0.47, "q0": 0.5, "zh_gap": 0.2}))[0], "English worse"
    assert not multilingual(report(0.1, 0.1, 0.6, e5={"aiq": 0.5, "q0": 0.5, "zh_gap": 0.08}))[0], "gain < 5 points"
    assert not multilingual(report(0.1, 0.1, 0.6))[0], "not measured: not offered"
