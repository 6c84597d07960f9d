"""The gateway's own JSON bodies, as pydantic models: its errors and its own endpoints' answers, as
`/openapi.json` documents them (`server.api.openapi` puts them on the routes). They only describe; the handlers
build their answers themselves. They are closed (`extra="forbid"`), so a field added to an answer without its
schema is noticed by the fuzz test. The relayed APIs' answers, open to the worker's extra fields, are in
`server.api.openapi_answers`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import SkipJsonSchema

# --- Errors ------------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """OpenAI's error object. A worker's 4xx keeps its own message, type and code (vLLM's code is the status)."""

    model_config = ConfigDict(extra="forbid")

    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """Every error the gateway answers with: `{"error": {"message", "type", "param", "code"}}`."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    """Anthropic's error object."""

    model_config = ConfigDict(extra="forbid")

    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Every error on Anthropic's paths (`/v1/messages...`): `{"type": "error", "error": {"type", "message"}}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["error"]
    error: AnthropicErrorDetail


class ConfigErrorDetail(ErrorDetail):
    """A rejected reload's error: OpenAI's fields, and every problem found in the config file."""

    problems: list[str]


class ConfigErrorResponse(BaseModel):
    """`POST /admin/reload` with an invalid config file (the running config keeps serving)."""

    model_config = ConfigDict(extra="forbid")

    error: ConfigErrorDetail


# --- The gateway's own answers ----------------------------------------------------------------------------


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CandidateScores(_Closed):
    """One candidate's predictions and the policy's combined score."""

    name: str
    score: float
    predicted_quality: float | None
    predicted_cost_usd: float | None


class Decision(_Closed):
    """A policy's decision: every candidate, best first."""

    policy: str
    artifact: str
    chosen: str
    reason: str
    candidates: list[CandidateScores]


class WorkerLoad(_Closed):
    """A worker the request could go to, and its load."""

    name: str
    health: Literal["unknown", "up", "down"]
    load: float


class RouteExplanation(_Closed):
    """`POST /v1/route`: the decision a chat request would get. The decision's fields are there only when a
    policy chose (`model` named a policy or `auto`); for a worker or model named directly, `reason` says so."""

    object: Literal["turnout.route"]
    request_id: str
    model: str
    policy: str | None
    config_generation: int
    reason: str
    workers: list[WorkerLoad]
    shadow: Decision | None
    artifact: str | SkipJsonSchema[None] = None
    chosen: str | SkipJsonSchema[None] = None
    candidates: list[CandidateScores] | SkipJsonSchema[None] = None
    routing_ms: float | SkipJsonSchema[None] = None
    embedding_cached: bool | None = None
    affinity: bool | SkipJsonSchema[None] = None
    unavailable: list[str] | SkipJsonSchema[None] = None


class FeedbackResult(_Closed):
    """`POST /v1/feedback`: the score reached the policy (`accepted`) or was a repeat (`ignored`)."""

    status: Literal["accepted", "ignored"]
    request_id: str
    policy: str | None
    reason: str | SkipJsonSchema[None] = None


class Reloaded(_Closed):
    """`POST /admin/reload`: the generation now in force, its policies (artifact versions) and workers."""

    status: Literal["reloaded"]
    generation: int
    default_policy: str | None
    policies: dict[str, str]
    workers: list[str]


class KeyCreated(_Closed):
    """`POST /admin/keys`: the new key, shown this once (only its SHA-256 is stored)."""

    name: str
    key: str


class KeyRevoked(_Closed):
    """`DELETE /admin/keys/{name}`."""

    revoked: str


class ModelCard(_Closed):
    """A served model, `auto`, or a policy as `turnout/<policy>`."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: Literal["turnout"]


class ModelList(_Closed):
    """`GET /v1/models`."""

    object: Literal["list"]
    data: list[ModelCard]


class Alive(_Closed):
    """`GET /healthz`."""

    status: Literal["ok"]


class _WorkerNumbers(_Closed):
    model: str
    health: Literal["unknown", "up", "down"]
    in_flight: int
    error: str | None
    running: float | None
    waiting: float | None
    kv_cache_usage: float | None


class WorkerState(_WorkerNumbers):
    """A worker's health, the queue it last reported, its circuit breaker and the requests queued for it here."""

    breaker: Literal["closed", "half_open", "open"]
    queued: int


class Readiness(_Closed):
    """`GET /readyz`: 200 when at least one worker is up, 503 (same body) otherwise."""

    ready: bool
    workers: dict[str, WorkerState]


class Percentiles(_Closed):
    """Milliseconds over the last requests."""

    p50: float
    p90: float
    p99: float
    n: int


class ModelStatus(_Closed):
    """One model's totals since the start."""

    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    reference_cost_usd: float
    latency_ms: Percentiles | None
    ttft_ms: Percentiles | None


class WorkerStatus(_WorkerNumbers):
    """A worker on the status page."""

    name: str
    up: bool


class StatusSnapshot(_Closed):
    """`GET /ui/status.json`: the status page's numbers."""

    uptime_s: float
    config_generation: int
    requests: int
    reference_model: str
    cost_usd: float
    reference_cost_usd: float
    savings_usd: float
    savings_share: float | None
    routing_mix: dict[str, dict[str, int]]
    models: dict[str, ModelStatus]
    workers: list[WorkerStatus]
