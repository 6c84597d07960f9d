"""A keyed request's admission: what the key may use (403), its per-minute limits (429), its budget's worst-case
hold, and the settle when the request ends. The numbers behind it are in `server.limits`."""

from __future__ import annotations

import dataclasses
from typing import Any

from server.accounting import Exchange
from server.config import Price
from server.keys import KeyRecord, forbidden
from server.limits import Admission, prompt_tokens_bound
from server.protocol import RouteOptions
from server.routing import RouteInput, explicit_policy
from server.state import GatewayState, Live


async def admit(gw: GatewayState, live: Live, key: KeyRecord, inp: RouteInput, body: dict[str, Any],
                ex: Exchange) -> Admission:
    """Check what the key may use (403) and count the request against its per-minute limits (429); arrange
    for its holds to be settled when it ends."""
    policy = live.table.policy_for(inp.model, explicit_policy(inp))
    if policy is not None and not key.allows_policy(policy):
        raise forbidden(f"Key '{key.name}' may not use policy '{policy}'.", "model")
    if policy is None and not key.allows_model(inp.model):
        raise forbidden(f"Key '{key.name}' may not call '{inp.model}' directly.", "model")
    c = key.config
    if (c.budget_usd is not None or c.tokens_per_minute is not None) and not (
            body.get("max_tokens") or body.get("max_completion_tokens")):
        # A worst case needs a bound on the answer: without one a request could spend past the budget.
        body["max_tokens"] = live.config.server.default_max_tokens
    adm = await gw.limits.admit(key, worst_tokens(body))

    def settle(done: Exchange) -> None:
        if done.cost_usd is None and done.worker is not None and done.status in UNMETERED:
            # The worker may have generated without reporting usage (a stream cut before its usage chunk, a
            # client gone mid-answer): charge the worst case held, never less than what may have been spent.
            gw.spawn(gw.limits.settle(adm, adm.usd_held, adm.tokens_held or None))
            return
        used = (done.prompt_tokens or 0) + (done.completion_tokens or 0)
        gw.spawn(gw.limits.settle(adm, done.cost_usd, used))

    ex.on_finish.append(settle)
    ex.key = key.name
    return adm


#: Outcomes after which a worker may have generated tokens it did not report.
UNMETERED = frozenset({"ok", "stream_error", "client_disconnect"})


def _max_out(body: dict[str, Any]) -> int:
    """The most answer tokens: the larger of max_tokens and max_completion_tokens (engines differ on which
    wins), for each of n answers to each prompt of a batched completion."""
    out = max(int(body.get("max_tokens") or 0), int(body.get("max_completion_tokens") or 0))
    n = int(body.get("n") or 1)
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return out * n * prompts


def worst_tokens(body: dict[str, Any]) -> int:
    """The most tokens the request can use: its prompt's upper bound plus max_tokens for each of n answers."""
    return prompt_tokens_bound(body) + _max_out(body)


def worst_cost_usd(body: dict[str, Any], prices: list[Price]) -> float:
    """The most the request can cost on any of the models it may go to (fallbacks included)."""
    return max(p.cost_usd(prompt_tokens_bound(body), _max_out(body)) for p in prices)


def budget_route_input(inp: RouteInput, left: float | None) -> RouteInput:
    """With what is left of the key's budget, a cost-aware policy prefers a model whose expected cost fits."""
    if left is None or left <= 0:
        return inp
    cap = min(left, inp.options.max_cost_usd or left) if inp.options else left
    opts = inp.options.model_copy(update={"max_cost_usd": cap}) if inp.options else RouteOptions(max_cost_usd=cap)
    return dataclasses.replace(inp, options=opts)


async def hold_for(gw: GatewayState, live: Live, adm: Admission, body: dict[str, Any], targets: list[str]) -> list[str]:
    """Hold the worst case over the targets (the choice and its fallbacks) and return the targets kept: with a
    budget, fallbacks only to models whose worst case fits what is left."""
    def worst(t: str) -> float:
        return worst_cost_usd(body, [live.registry.resolve(t)[0].config.price])

    if adm.remaining_usd is not None:
        targets = [t for i, t in enumerate(targets) if i == 0 or worst(t) <= adm.remaining_usd]
    await gw.limits.hold(adm, max(worst(t) for t in targets))
    return targets
