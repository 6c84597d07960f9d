"""`turnout collect`'s engine: every prompt to every chosen model, within a spending cap, resumable.

Before anything is sent the plan is priced at the configured prices: an estimate (each prompt's tokens guessed
from its bytes, `max_tokens` of answer) and each call's worst case (the prompt's upper bound on tokens, the same
bound the gateway's budgets hold). A cap below the estimate refuses to start, unless `partial` asks to collect
what the cap buys. While it runs, each call holds its worst case against the cap and settles at what the
worker's usage says it cost, so the cap is never passed: the collection stops at the first call that might pass
it. Calls go prompt by prompt, so a partial collection has every model's answer to the prompts it reached.
Answers are appended as they arrive (`server.fleet.run`); Ctrl-C stops sending and waits for the calls in
flight, so no call is lost and none is sent twice.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from server.config import Price
from server.fleet.caller import FleetCaller
from server.fleet.run import Answer, AnswerWriter
from server.fleet.sources import PromptItem
from server.quota.limits import prompt_tokens_bound

#: The usual rough rule for English text with BPE tokenizers, plus the chat template's few tokens per message.
BYTES_PER_TOKEN, TEMPLATE_TOKENS = 4, 8


class CollectError(ValueError):
    """A collection that cannot start as asked (unknown model, a cap below the plan's cost)."""


@dataclass(frozen=True, slots=True)
class Job:
    """One call to make: a prompt to a model, its estimated and its worst-case cost."""

    prompt: PromptItem
    model: str
    estimate_usd: float
    worst_usd: float


@dataclass(slots=True)
class Tally:
    """What a collection did, for its progress line and its summary."""

    planned: int = 0
    done: int = 0
    failed: int = 0
    spent_usd: float = 0.0
    held_usd: float = 0.0
    stopped_by_cap: bool = False
    interrupted: bool = False
    error: Exception | None = None  # what stopped the collection, when a call's answer could not be recorded
    per_model: dict[str, list[Answer]] = field(default_factory=dict)


def estimated_prompt_tokens(prompt: PromptItem) -> int:
    """A prompt's tokens, estimated from its bytes (no tokenizer at hand: the worker has it)."""
    text_bytes = sum(len(str(m.get("content", "")).encode()) for m in prompt.messages)
    return math.ceil(text_bytes / BYTES_PER_TOKEN) + TEMPLATE_TOKENS * len(prompt.messages)


def plan(prompts: Sequence[PromptItem], models: Sequence[str], done: set[tuple[str, str]],
         prices: Mapping[str, Price], max_tokens: int) -> list[Job]:
    """The calls still to make, prompt by prompt (each prompt's models close together in time)."""
    jobs: list[Job] = []
    for p in prompts:
        for m in models:
            if (p.prompt_id, m) not in done:
                price = prices[m]
                bound = prompt_tokens_bound({"messages": list(p.messages)})
                jobs.append(Job(p, m, price.cost_usd(estimated_prompt_tokens(p), max_tokens),
                                price.cost_usd(bound, max_tokens)))
    return jobs


def check_models(models: Sequence[str], known: Sequence[str]) -> None:
    """`CollectError` naming every model the config does not serve."""
    unknown = [m for m in models if m not in known]
    if unknown:
        raise CollectError(f"unknown models {unknown}: the config serves {list(dict.fromkeys(known))}")


def check_cap(jobs: Sequence[Job], max_cost_usd: float | None, spent_usd: float, partial: bool = False) -> None:
    """Refuse to start when the plan's estimate (with what this run already spent) passes the cap, unless
    `partial` (collect what the cap buys)."""
    if max_cost_usd is None or partial:
        return
    estimate = sum(j.estimate_usd for j in jobs)
    if spent_usd + estimate > max_cost_usd:
        raise CollectError(
            f"the {len(jobs)} calls are estimated at ${estimate:.6f} (and this run has spent ${spent_usd:.6f}), over "
            f"--max-cost-usd ${max_cost_usd:.6f}: nothing was sent. Raise the cap, or lower --sample, --max-tokens "
            "or --models, or pass --partial to collect what the cap buys")


@dataclass(slots=True)
class Collector:
    """Runs the jobs `concurrency` at a time, recording each answer as it arrives."""

    caller: FleetCaller
    writer: AnswerWriter
    max_tokens: int
    concurrency: int = 4
    max_cost_usd: float | None = None
    sampling: dict[str, object] = field(default_factory=dict)
    on_answer: Callable[[Tally], None] = lambda tally: None
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set on Ctrl-C: send nothing more

    async def run(self, jobs: Sequence[Job], spent_usd: float = 0.0) -> Tally:
        """Make every call (or as many as the cap and a stop allow); in-flight calls always finish."""
        tally = Tally(planned=len(jobs), spent_usd=spent_usd)
        slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task[None]] = set()
        for job in jobs:
            await slots.acquire()
            if self.stop.is_set() or not self._hold(tally, job):
                slots.release()
                break
            task = asyncio.create_task(self._one(job, tally, slots))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
        if tally.error is not None:
            raise tally.error
        tally.interrupted = self.stop.is_set()
        return tally

    def _hold(self, tally: Tally, job: Job) -> bool:
        """Hold the call's worst case against the cap; False (and the collection stops) when it does not fit."""
        if self.max_cost_usd is not None and tally.spent_usd + tally.held_usd + job.worst_usd > self.max_cost_usd:
            tally.stopped_by_cap = True
            return False
        tally.held_usd += job.worst_usd
        return True

    async def _one(self, job: Job, tally: Tally, slots: asyncio.Semaphore) -> None:
        try:
            answer = await self.caller.chat(job.prompt.prompt_id, job.model, job.prompt.messages,
                                            max_tokens=self.max_tokens, sampling=dict(self.sampling))
            if answer.unmetered:
                # The worker may have generated without reporting usage (a stream cut, no usage sent): count
                # the worst case as spent, never less than what may have been spent.
                answer.cost_usd = job.worst_usd
            self.writer.write(answer)
            tally.held_usd -= job.worst_usd
            tally.spent_usd += answer.cost_usd or 0.0
            tally.done += 1
            tally.failed += 0 if answer.ok else 1
            tally.per_model.setdefault(job.model, []).append(answer)
            self.on_answer(tally)
        except Exception as exc:  # an answer that cannot be recorded (disk full): stop sending, report it
            if tally.error is None:
                tally.error = exc
            self.stop.set()
        finally:
            slots.release()
