"""Locust users for Turnout (for those who prefer Locust to `loadtest.openloop`): chat requests through the
official `openai` SDK, a quarter of them streamed, with time to first token reported as its own entry.

    pip install locust==2.47.0
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080/v1 --headless -u 20 -r 5 -t 60s

`TURNOUT_SCENARIO` (default `loadtest/scenarios/chat-mixed.yaml`) supplies the model, prompts, max_tokens and
stream share; Locust itself sets the number of users and their pace.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import openai
from locust import HttpUser, between, task

from loadtest.openloop import load_scenario

SCENARIO = load_scenario(Path(os.environ.get("TURNOUT_SCENARIO", "loadtest/scenarios/chat-mixed.yaml")))


class ChatUser(HttpUser):
    """One client sending chat completions (streamed or not, as the scenario's share says)."""

    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        """One SDK client per user (the sync client: Locust runs users on gevent)."""
        self.client_sdk = openai.OpenAI(base_url=self.host, api_key=SCENARIO.api_key, max_retries=0,
                                        timeout=SCENARIO.timeout_s)

    @task
    def chat(self) -> None:
        """One request, reported to Locust under its kind (and TTFT for streams)."""
        stream = random.random() < SCENARIO.stream_share
        messages = [{"role": "user", "content": random.choice(SCENARIO.prompts)}]
        name = "chat (stream)" if stream else "chat"
        t0 = time.perf_counter()
        try:
            if stream:
                first = None
                for chunk in self.client_sdk.chat.completions.create(
                        model=SCENARIO.model, messages=messages, max_tokens=SCENARIO.max_tokens, stream=True,
                        extra_body=SCENARIO.extra_body or None):
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
                        self.environment.events.request.fire(request_type="SSE", name="time to first token",
                                                             response_time=first * 1000, response_length=0,
                                                             exception=None, context={})
            else:
                self.client_sdk.chat.completions.create(model=SCENARIO.model, messages=messages,
                                                        max_tokens=SCENARIO.max_tokens,
                                                        extra_body=SCENARIO.extra_body or None)
            error: Exception | None = None
        except openai.APIError as exc:
            error = exc
        self.environment.events.request.fire(request_type="POST", name=name,
                                             response_time=(time.perf_counter() - t0) * 1000, response_length=0,
                                             exception=error, context={})
