"""Worst cases that budgets and token limits hold, and corrections that land in the minute they belong to."""

from __future__ import annotations

from server.quota.admission import worst_tokens
from server.quota.limits import MEDIA_PART_TOKENS, prompt_tokens_bound
from server.store.memory import MemoryStore

MSG = [{"role": "user", "content": "hello"}]


def test_the_larger_output_limit_and_every_answer_count() -> None:
    base = prompt_tokens_bound({"messages": MSG})
    assert worst_tokens({"messages": MSG, "max_tokens": 1, "max_completion_tokens": 100}) == base + 100
    assert worst_tokens({"messages": MSG, "max_completion_tokens": 7, "n": 3}) == base + 21
    batch = {"prompt": ["a", "b", "c", "d"], "max_tokens": 10, "n": 2}
    assert worst_tokens(batch) == prompt_tokens_bound(batch) + 80, "a batched completion answers each prompt"
    tokens = {"prompt": [1, 2, 3], "max_tokens": 10}
    assert worst_tokens(tokens) == prompt_tokens_bound(tokens) + 10, "one prompt given as token ids"


def test_the_prompt_bound_covers_what_the_template_renders() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "x": "y" * 500}}}]
    assert prompt_tokens_bound({"messages": MSG, "tools": tools}) > prompt_tokens_bound({"messages": MSG}) + 500
    image = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                          {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]
    assert prompt_tokens_bound({"messages": image}) >= MEDIA_PART_TOKENS


async def test_a_correction_goes_to_the_minute_that_was_charged() -> None:
    now = [59.0]
    store = MemoryStore(clock=lambda: now[0])
    assert await store.window_add("tpm", 10_000, 10_000, 60) is None
    now[0] = 61.0  # the request ends in the next minute, having used 100 tokens
    await store.window_adjust("tpm", -9_900, 60, at=59.0)
    assert await store.window_add("tpm", 10_000, 10_000, 60) is None, "the new minute is untouched"
    assert await store.window_add("tpm", 1, 10_000, 60) is not None
    now[0] = 200.0
    await store.window_adjust("tpm", -5, 60, at=61.0)  # that window is over: nothing to correct
    assert await store.window_add("tpm", 10_000, 10_000, 60) is None
