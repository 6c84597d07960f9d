"""A keyed request's admission, in the numbers `server.quota.limits` keeps: what the key may use (403), its
per-minute limits (429) and its budget's worst-case hold, made before routing so routing can keep to what fits
and trimmed once the model is chosen; then the settle when the request ends. One round trip to the store on
the request's path. The request pipeline (`server.api.completions`) runs these steps in order."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from server.config import Price
from server.policy.options import RouteOptions
from server.policy.selection import RouteInput
from server.quota.keys import KeyRecord, forbidden
from server.quota.limits import Admission, Limits, prompt_tokens_bound
from server.telemetry.record import Exchange

Spawn = Callable[[Coroutine[Any, Any, None]], None]


def check_access(key: KeyRecord, policy: str | None, *names: str) -> None:
    """403 unless the key may use `policy` (or, with no policy, call the worker or model known by `names`
    directly). Restrictions compose: see `KeyRecord.allows_direct` and `allowed_candidates`."""
    if policy is not None and not key.allows_policy(policy):
        raise forbidden(f"Key '{key.name}' may not use policy '{policy}'.", "model")
    if policy is None and not key.allows_direct(*names):
        raise forbidden(f"Key '{key.name}' may not call '{names[0]}' directly.", "model")


def allowed_candidates(key: KeyRecord, inp: RouteInput, candidates: list[str],
                       names_of: Callable[[str], list[str]]) -> RouteInput:
    """A policy's candidates cut to the models the key may reach (its `models` list), so neither the policy's
    choice, nor its fallbacks, nor a client's `turnout.candidates` can go past them; 403 when none is left.
    `names_of`: every name a target is known by (itself, its model, its workers)."""
    if not key.config.models:
        return inp
    allowed = [t for t in candidates if key.allows_model(*names_of(t))]
    if not allowed:
        raise forbidden(f"Key '{key.name}' may reach none of this policy's candidates ({', '.join(candidates)}).",
                        "model")
    if allowed == candidates:
        return inp
    opts = inp.options or RouteOptions()
    return dataclasses.replace(inp, options=opts.model_copy(update={"candidates": allowed}))


@dataclasses.dataclass(frozen=True, slots=True)
class AnswerLength:
    """How the worker bounds an answer's length on one endpoint, as vLLM reads its request: the fields it honours,
    the first one set winning, and its default when none is (None: no bound short of the context window)."""

    fields: tuple[str, ...]
    default: int | None

    def most(self, body: dict[str, Any]) -> int | None:
        """The most tokens one answer may have (None: unbounded)."""
        for name in self.fields:
            value = body.get(name)
            if value is not None:
                return int(value)
        return self.default


#: vLLM's chat: `max_completion_tokens` if set, else `max_tokens`, else up to the context window.
CHAT_LENGTH = AnswerLength(("max_completion_tokens", "max_tokens"), None)
#: vLLM's text completions: `max_tokens` only (`max_completion_tokens` is ignored there), 16 when unset.
COMPLETION_LENGTH = AnswerLength(("max_tokens",), 16)
#: The Responses API's `max_output_tokens`; Anthropic's `max_tokens` (required).
RESPONSES_LENGTH = AnswerLength(("max_output_tokens",), None)
MESSAGES_LENGTH = AnswerLength(("max_tokens",), None)
#: Endpoints that generate nothing (embeddings, scores, token counts).
NO_ANSWER = AnswerLength((), 0)


@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """How a request's worst case is read: how its endpoint bounds the answer, and the prompt tokens it carries
    along that are not in its body (a Responses follow-up continues a conversation the worker keeps)."""

    length: AnswerLength = CHAT_LENGTH
    carried_tokens: int = 0


def bound_answer(key: KeyRecord, body: dict[str, Any], default_max_tokens: int, bounds: Bounds) -> None:
    """Give the answer a length bound when the key has a budget or a token limit and the worker would have none:
    a worst case needs one, or a request could spend past the budget. The bound goes in the field the worker
    honours on that endpoint (`max_output_tokens` on the Responses API); an endpoint with a default bound (text
    completions' 16) keeps it."""
    c = key.config
    if c.budget_usd is None and c.tokens_per_minute is None:
        return
    if bounds.length.fields and bounds.length.most(body) is None:
        body[bounds.length.fields[-1]] = default_max_tokens


async def admit(limits: Limits, key: KeyRecord, body: dict[str, Any], prices: Mapping[str, Price],
                bounds: Bounds = Bounds()) -> Admission:
    """Count the request against the key's per-minute limits and hold its worst-case cost against its budget
    (429 past either). `prices`: each candidate target's price, whose worst cases the hold must cover."""
    worst: dict[str, float] = {}
    if key.config.budget_usd is not None:
        prompt, out = prompt_tokens_bound(body) + bounds.carried_tokens, _max_out(body, bounds.length)
        worst = {t: price.cost_usd(prompt, out) for t, price in prices.items()}
    adm = await limits.admit(key, worst_tokens(body, bounds), worst)
    adm.worst_usd = worst
    return adm


async def settle(limits: Limits, adm: Admission, ex: Exchange) -> None:
    """Settle the hold of the ended request `ex`: what it cost, or the worst case held when the worker may
    have generated without reporting usage (a stream cut before its usage chunk, a client gone mid-answer):
    never less than what may have been spent."""
    if ex.cost_usd is None and ex.worker is not None and ex.status.unmetered:
        await limits.settle(adm, adm.usd_held, adm.tokens_held or None)
        return
    used = (ex.prompt_tokens or 0) + (ex.completion_tokens or 0)
    if adm.budget_key is not None and ex.cost_usd is not None and ex.cost_usd > adm.usd_held * (1 + 1e-9) + 1e-15:
        limits.overrun(adm, ex.cost_usd, ex.request_id)
    await limits.settle(adm, ex.cost_usd, used)


def _max_out(body: dict[str, Any], length: AnswerLength) -> int:
    """The most answer tokens: one answer's bound (0 when unbounded: only a key without budget or token limit
    sends such a request, and nothing is held for it), for each of n answers to each prompt of a batched
    completion."""
    out = length.most(body) or 0
    n = int(body.get("n") or 1)
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return out * n * prompts


def worst_tokens(body: dict[str, Any], bounds: Bounds = Bounds()) -> int:
    """The most tokens the request can use: its prompt's upper bound (with what it carries along) plus the
    answer's bound for each of n answers."""
    return prompt_tokens_bound(body) + bounds.carried_tokens + _max_out(body, bounds.length)


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


def keep_within_hold(limits: Limits, adm: Admission, targets: list[str], spawn: Spawn) -> list[str]:
    """The targets (the choice, then its fallbacks) whose worst case fits the hold; the part of the hold that
    none of them can cost is given back (off the request's path, through `spawn`)."""
    if adm.budget_key is None:
        return targets
    kept = [t for i, t in enumerate(targets) if i == 0 or adm.worst_usd.get(t, math.inf) <= adm.usd_held]
    excess = adm.usd_held - max(adm.worst_usd.get(t, adm.usd_held) for t in kept)
    if excess > 0:
        spawn(limits.release(adm, excess))
    return kept
