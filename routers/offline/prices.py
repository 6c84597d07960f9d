"""Model prices for routing tables without costs: reading them from a `models.json`, checking them, and
estimating each answer's cost from token counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

BYTES_PER_TOKEN = 4  # the usual rough rule for English text with BPE tokenizers; an approximation
OUT_CHARS = "output_chars__"
FloatArray = npt.NDArray[np.float64]
Prices = dict[str, tuple[float, float]]


class TableError(ValueError):
    """A routing table (or the prices beside it) cannot be used; the message names the column or row."""


def choose_prices(
    path: Path, prices: Prices | None, models: list[str], problems: list[str]
) -> tuple[Prices | None, str]:
    """Prices given by the caller, else from models.json beside the table; None when neither exists."""
    origin = "the given prices"
    if prices is None:
        beside = path.parent / "models.json"
        prices, origin = read_models_json_prices(beside), beside.name
    if prices is None:
        return None, ""
    missing = [m for m in models if m not in prices]
    if missing:
        problems.append(f"no price for models {missing} in {origin}")
    for model in (m for m in models if m in prices):
        pair = prices[model]
        if len(pair) != 2 or not all(isinstance(p, int | float) and math.isfinite(p) and p >= 0 for p in pair):
            problems.append(f"{origin}: price for {model!r} must be two numbers >= 0, got {pair!r}")
    return prices, origin


def read_models_json_prices(path: Path) -> Prices | None:
    """Per-model (input, output) USD per 1M tokens from a models.json, or None if it has no prices.

    Accepts {"prices_usd_per_1M_tokens": {model: {"input_price", "output_price"}}} (shared/data) and
    {"prices": {model: {"input_per_1m", "output_per_1m"}}}.
    """
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TableError(f"{path.name}: cannot read prices: {exc}") from exc
    if not isinstance(doc, dict):
        return None
    for section, keys in (("prices_usd_per_1M_tokens", ("input_price", "output_price")),
                          ("prices", ("input_per_1m", "output_per_1m"))):
        table = doc.get(section)
        if not isinstance(table, dict):
            continue
        out: Prices = {}
        for model, entry in table.items():
            try:
                out[str(model)] = (float(entry[keys[0]]), float(entry[keys[1]]))
            except (KeyError, TypeError, ValueError) as exc:
                msg = f"{path.name}: {section}[{model!r}] needs numeric {keys[0]!r} and {keys[1]!r}"
                raise TableError(msg) from exc
        return out
    return None


def estimate_costs(
    prompts: list[str], models: list[str], prices: Prices, out_chars: FloatArray | None, output_tokens: int
) -> FloatArray:
    """Each prompt's cost on each model, from prices and token counts estimated from the text (see
    `token_rule`)."""
    prompt_tokens = np.array([math.ceil(len(p.encode("utf-8")) / BYTES_PER_TOKEN) for p in prompts], dtype=np.float64)
    answer_tokens = np.full((len(prompts), len(models)), float(output_tokens))
    if out_chars is not None:
        known = ~np.isnan(out_chars)
        answer_tokens[known] = np.ceil(out_chars[known] / BYTES_PER_TOKEN)
    price_in = np.array([prices[m][0] for m in models])
    price_out = np.array([prices[m][1] for m in models])
    costs: FloatArray = (prompt_tokens[:, None] * price_in[None, :] + answer_tokens * price_out[None, :]) / 1e6
    return costs


def token_rule(out_chars: FloatArray | None, output_tokens: int) -> str:
    """How `estimate_costs` counted tokens, in words (for reports)."""
    answer = f"{output_tokens}"
    if out_chars is not None and not np.isnan(out_chars).all():
        answer = f"ceil({OUT_CHARS}<model> / {BYTES_PER_TOKEN}) where given, else {output_tokens}"
    return f"prompt tokens = ceil(UTF-8 bytes / {BYTES_PER_TOKEN}), output tokens = {answer}"
