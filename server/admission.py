"""A keyed request's admission: what the key may use (403), its per-minute limits (429), its budget's worst-case
hold (made before routing, so routing can keep to what fits; trimmed once the model is chosen), and the settle
when the request ends: one round trip to the store on the request's path. The numbers are in `server.limits`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from server.accounting import Exchange
from server.keys import KeyRecord, forbidden
from server.limits import Admission, prompt_tokens_bound
from server.protocol import RouteOptions
from server.routing import RouteInput, candidate_targets, explicit_policy
from server.state import GatewayState, Live


async def admit(gw: GatewayState, live: Live, key: KeyRecord, inp: RouteInput, body: dict[str, Any],
                ex: Exchange) -> Admission:
    """Check what the key may use (403), count the request against its per-minute limits and hold its
    worst-case cost against its budget (429); arrange for both to be settled when it ends."""
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
    worst: dict[str, float] = {}
    if c.budget_usd is not None:
        prompt, out = prompt_tokens_bound(body), _max_out(body)
        worst = {t: live.registry.resolve(t)[0].config.price.cost_usd(prompt, out)
                 for t in candidate_targets(live.table, live.registry, inp)}
    adm = await gw.limits.admit(key, worst_tokens(body), worst)
    adm.worst_usd = worst

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


def within_budget(inp: RouteInput, adm: Admission) -> RouteInput:
    """Routing within what the key's budget allows: only the candidates whose worst case fits the hold, and
    for a cost-aware policy an expected cost no more than what was left of the budget."""
    if adm.remaining_usd is None:
        return inp
    opts = inp.options or RouteOptions()
    update: dict[str, Any] = {}
    fits = [t for t, usd in adm.worst_usd.items() if usd <= adm.usd_held]
    if len(fits) < len(adm.worst_usd):
        update["candidates"] = fits
    if adm.remaining_usd > 0:
        update["max_cost_usd"] = min(adm.remaining_usd, opts.max_cost_usd or adm.remaining_usd)
    return dataclasses.replace(inp, options=opts.model_copy(update=update)) if update else inp


def keep_within_hold(gw: GatewayState, adm: Admission, targets: list[str]) -> list[str]:
    """The targets (the choice, then its fallbacks) whose worst case fits the hold; the part of the hold that
    none of them can cost is given back (off the request's path)."""
    if adm.budget_key is None:
        return targets
    kept = [t for i, t in enumerate(targets) if i == 0 or adm.worst_usd.get(t, math.inf) <= adm.usd_held]
    excess = adm.usd_held - max(adm.worst_usd.get(t, adm.usd_held) for t in kept)
    if excess > 0:
        gw.spawn(gw.limits.release(adm, excess))
    return kept
