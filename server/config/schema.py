"""The config's schema: pydantic models (`extra="forbid"`) of every section, and `ConfigError`.

Secrets never live here: a worker names the environment variable that holds its API key.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Annotated, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from routers.specs import PolicySpec

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"


class ConfigError(Exception):
    """A config that cannot be used; `problems` lists every problem found, one line each."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Model):
    """USD per 1M tokens."""

    input_per_1m: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    output_per_1m: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What these token counts cost at this price."""
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1e6


def check_http_url(v: str) -> str:
    """`v` if it is an absolute http(s) URL with a host and a valid port, else ValueError saying why."""
    example = "such as http://127.0.0.1:8091/v1"
    try:
        url = httpx.URL(v)
        port = url.port  # parsing the port may itself fail
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ValueError(f"must be an http(s) URL {example}, got {v!r} ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host or re.search(r"\s", v):
        raise ValueError(f"must be an http(s) URL {example}, got {v!r}")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range in {v!r}")
    return v


class Timeouts(_Model):
    """Per-request upstream time limits (every one optional here: a worker's overrides of `upstream`'s).

    - `connect_timeout_s`: to open a connection to the worker.
    - `ttft_timeout_s`: from sending a streamed request to its first event (before anything reached the
      client, so a worker that does not start answering in time is retried or falls back).
    - `idle_timeout_s`: the longest silence between two events of a stream.
    - `total_timeout_s`: the whole exchange (for a non-streamed request, the time to its answer).
    """

    connect_timeout_s: Annotated[float, Field(gt=0)] | None = None
    ttft_timeout_s: Annotated[float, Field(gt=0)] | None = None
    idle_timeout_s: Annotated[float, Field(gt=0)] | None = None
    total_timeout_s: Annotated[float, Field(gt=0)] | None = None


class WorkerConfig(_Model):
    """One OpenAI-compatible upstream (a vLLM server). Several workers may serve one model."""

    name: str = Field(pattern=_NAME, max_length=64)
    model: str = Field(min_length=1, max_length=256)
    base_url: str
    price: Price = Price()
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    health_url: str | None = None
    # Where the queue length is read (vLLM's Prometheus text); `poll_load: false` for upstreams without it.
    metrics_url: str | None = None
    poll_load: bool = True
    # Overrides of `upstream`'s timeouts for this worker (a slow large model may need a longer first token).
    timeouts: Timeouts = Timeouts()
    # Requests sent to this worker at once; more wait (see `reliability`) or go elsewhere. None: no limit.
    max_concurrency: Annotated[int, Field(ge=1)] | None = None
    # generate: serves chat and text completions (a vLLM server in its default runner); pooling: serves
    # embeddings (`vllm serve --runner pooling`). Chat routing never picks a pooling worker, and embeddings go only
    # to pooling workers.
    kind: Literal["generate", "pooling"] = "generate"

    @field_validator("base_url", "health_url", "metrics_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        return None if v is None else check_http_url(v).rstrip("/")

    def resolved_health_url(self) -> str:
        """Where the health check looks: `health_url`, else the OpenAI `models` listing."""
        return self.health_url or f"{self.base_url}/models"

    def resolved_metrics_url(self) -> str:
        """Where the load poller looks: `metrics_url`, else `/metrics` at the root of `base_url`'s server
        (vLLM's layout: the API under /v1, metrics beside it)."""
        if self.metrics_url:
            return self.metrics_url
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        return f"{root}/metrics"


class UpstreamConfig(_Model):
    """Timeouts (see `Timeouts`; each worker may override them) and pool limits of the one shared HTTP client
    to the workers."""

    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    ttft_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    idle_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    total_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    pool_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    max_connections: Annotated[int, Field(ge=1)] = 1000
    # Below vLLM's (and uvicorn's) 5 s keep-alive, so the pool never reuses a connection the worker
    # is closing at that moment, which would fail the request.
    keepalive_expiry_s: Annotated[float, Field(gt=0)] = 4.0


class ServerConfig(_Model):
    """Limits and housekeeping of the gateway itself."""

    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    health_interval_s: Annotated[float, Field(gt=0)] = 5.0
    health_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    # A worker that was up is marked down only after this many failed checks in a row, so one slow
    # answer does not take it out of rotation for a whole interval.
    health_failures_to_down: Annotated[int, Field(ge=1)] = 2
    # How often each worker's /metrics is read for its queue (vllm:num_requests_waiting and friends).
    load_interval_s: Annotated[float, Field(gt=0)] = 1.0
    # Feedback (`POST /v1/feedback`) is accepted for this long after a request, for this many requests.
    feedback_ttl_s: Annotated[float, Field(gt=0)] = 3600.0
    feedback_max_requests: Annotated[int, Field(ge=1)] = 100_000
    # How long the gateway remembers which worker made a Responses API response (a follow-up naming it by
    # `previous_response_id`, a GET or a cancel must reach that worker, which keeps responses in its memory).
    response_owner_ttl_s: Annotated[float, Field(gt=0)] = 7 * 86400.0
    # The environment variable holding the key of `POST /admin/reload`; unset = admin endpoints disabled.
    admin_key_env: str = Field(default="TURNOUT_ADMIN_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # With client keys on, /metrics and /ui/status.json need this token (or the admin key) as a bearer token: their
    # labels and figures name keys and costs. At least 32 characters; unset: they answer 403 saying so.
    metrics_token_env: str = Field(default="TURNOUT_METRICS_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # When the chosen model fails before its first byte (unreachable, timeout, 5xx), try up to this many of the
    # policy's next candidates, in the policy's own order (0: no fallback).
    max_fallbacks: Annotated[int, Field(ge=0, le=10)] = 2
    # Set as max_tokens on requests without one from keys with a budget or token limit (a worst case needs it).
    default_max_tokens: Annotated[int, Field(ge=1)] = 4096
    # Savings are counted against this model's price (a worker's model name); unset = the dearest configured model.
    reference_model: str | None = None
    # Record Prometheus metrics on the request path (off only to measure what they cost).
    metrics: bool = True
    # Write prompts and completions into the request log. Off by default: they may hold personal data.
    log_prompts: bool = False
    # Request limits beyond the body size: each is a 400 naming the field when passed.
    max_messages: Annotated[int, Field(ge=1)] = 2048
    # Content parts in all (of every message's list content and Anthropic's system blocks): each costs validation.
    max_content_parts: Annotated[int, Field(ge=1)] = 4096
    max_message_chars: Annotated[int, Field(ge=1)] = 1_000_000  # one message's text, all its parts together
    max_output_tokens: Annotated[int, Field(ge=1)] = 1_000_000  # max_tokens and max_completion_tokens
    max_n: Annotated[int, Field(ge=1, le=128)] = 16  # answers per request
    # How long an idle client connection is kept open. Longer than the idle timeout of the load balancers in front
    # (60 s on the common ones), so a balancer never reuses a connection the gateway is closing at that moment.
    keep_alive_s: Annotated[int, Field(ge=1)] = 75
    # Slow or huge clients (`server.connections`): a request's head must arrive within `header_timeout_s` and be at
    # most `max_header_bytes`; its body may pause `body_idle_timeout_s` between bytes and take `body_timeout_s` in
    # all (the 4 MiB `max_body_bytes` at 70 KB/s); past `max_connections` open connections (default: half the
    # open-file limit) a new one is answered 503 and closed. The server's own settings: a reload cannot change them.
    header_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    body_idle_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    body_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    max_header_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    max_connections: Annotated[int, Field(ge=1)] | None = None
    # On SIGTERM: stop accepting connections, let requests and streams in flight finish for up to this long,
    # then close.
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0


class EmbedderConfig(_Model):
    """The prompt embedder of learned policies, and its batching and cache."""

    # static (the default): word-piece vectors distilled from MiniLM, a fraction of a millisecond of CPU per prompt,
    # routing within noise of MiniLM on the bundled tables (docs/routing.md); onnx: MiniLM int8 itself (about 43 ms
    # of CPU for a 66-piece prompt on 2 cores: a 2-core gateway cannot embed 50 new prompts a second with it);
    # st: sentence-transformers; openai: a remote /v1/embeddings server (e.g. a vLLM pooling worker on a GPU).
    backend: Literal["onnx", "static", "st", "openai"] = "static"
    # For `st`: a local sentence-transformers model directory (never fetched from a hub).
    model_path: str | None = None
    # For `openai`: the server's base URL (ending in /v1), the served model, its vectors' dimension, and the
    # environment variable holding its API key (if it wants one).
    url: str | None = Field(default=None, pattern=r"^https?://")
    model: str | None = Field(default=None, min_length=1)
    dimensions: Annotated[int, Field(ge=1, le=65536)] | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # One embedding call may take this long; after a failure, requests do not wait on the server again for
    # `retry_after_s` (the policy's fallback answers them meanwhile).
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    retry_after_s: Annotated[float, Field(ge=0, le=600)] = 5.0
    # Texts are cut to this many characters before they are embedded, whatever the backend (bounded work per
    # request; the local models read 256 word pieces, far fewer characters than this); a vLLM server also cuts to
    # `truncate_prompt_tokens` tokens (unset for servers that do not know the field).
    max_chars: Annotated[int, Field(ge=1)] = 8192
    truncate_prompt_tokens: Annotated[int, Field(ge=1)] | None = None
    cache_size: Annotated[int, Field(ge=0)] = 10_000
    max_batch: Annotated[int, Field(ge=1, le=1024)] = 32
    # Concurrent requests arriving within this window are embedded in one model call. Default: 2 ms for a model
    # (one call of 8 prompts costs far less than 8 calls), 0 for `static`, whose embedding costs less than any wait.
    max_wait_ms: Annotated[float | None, Field(ge=0, le=1000)] = None

    @model_validator(mode="after")
    def _backend_fields(self) -> EmbedderConfig:
        if self.backend == "openai":
            missing = [f for f in ("url", "model", "dimensions") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"backend 'openai' needs {', '.join(missing)}")
        return self

    def wait_ms(self) -> float:
        """`max_wait_ms`, or the backend's default."""
        if self.max_wait_ms is not None:
            return self.max_wait_ms
        return 0.0 if self.backend == "static" else 2.0

    def spec(self) -> str:
        """The `routers.embedding.factory.make_embedder` spec string."""
        if self.backend == "st":
            return f"st:{self.model_path}"
        if self.backend == "openai":
            return f"openai:{self.model}@{self.url}"
        return self.backend


_ENV = r"^[A-Za-z_][A-Za-z0-9_]*$"


class KeyConfig(_Model):
    """A client API key and what it may do. The key itself is never in the YAML: give its SHA-256 (hex), or the
    name of an environment variable holding it. Unset limits are unlimited; empty lists allow everything."""

    name: str = Field(pattern=_NAME, max_length=64)
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    key_env: str | None = Field(default=None, pattern=_ENV)
    policies: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)
    requests_per_minute: Annotated[int, Field(ge=1)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = None
    budget_usd: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    budget_period: Literal["hour", "day", "month"] = "day"

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError("give exactly one of key_sha256 and key_env")
        return self


class AuthConfig(_Model):
    """Client authentication. Off by default (a private deployment); when on, every /v1 request needs a key."""

    enabled: bool = False
    keys: list[KeyConfig] = Field(default_factory=list)


class ReliabilityConfig(_Model):
    """Retries, the retry budget, circuit breakers and queueing at busy workers."""

    # A request whose worker fails before anything reached the client (unreachable, 5xx) is sent again to the
    # same model up to this many times (another replica first, when there is one), after a backoff of
    # `retry_backoff_s` x 2^attempt with full jitter; then to the policy's fallbacks (`server.max_fallbacks`).
    retries: Annotated[int, Field(ge=0, le=5)] = 1
    retry_backoff_s: Annotated[float, Field(ge=0, le=10)] = 0.05
    # Every re-send (retry or fallback) spends from a budget: at most `retry_budget_ratio` of the requests of
    # the last 10 s, plus `retry_budget_min_per_s`, so an outage cannot multiply the load on what is left.
    retry_budget_ratio: Annotated[float, Field(ge=0, le=10)] = 0.2
    retry_budget_min_per_s: Annotated[float, Field(ge=0)] = 5.0
    # A worker's breaker opens after this many failed requests in a row (not taking traffic), lets one probe
    # request through after `breaker_open_s`, and closes when a probe succeeds.
    breaker_failures: Annotated[int, Field(ge=1)] = 5
    breaker_open_s: Annotated[float, Field(gt=0)] = 10.0
    # At a worker at its `max_concurrency`, at most `max_queue` requests wait, each at most `queue_timeout_s`;
    # beyond that the request goes to a fallback or gets 503 with Retry-After.
    max_queue: Annotated[int, Field(ge=0)] = 100
    queue_timeout_s: Annotated[float, Field(ge=0)] = 5.0
    # Panic mode: when every worker of a model is down or its breaker open, send to the one that failed least
    # recently rather than refuse (as Envoy's panic threshold does): a fleet where each replica failed once in a
    # while is more often up than "no worker" says. Off: refuse with 503 `no_healthy_worker`.
    panic: bool = True


class StateConfig(_Model):
    """Where limits, budgets, feedback, affinity and the bandit's learning live."""

    backend: Literal["memory", "redis"] = "memory"
    # The Redis URL comes from the environment (it may hold a password), never from the YAML.
    url_env: str = Field(default="TURNOUT_REDIS_URL", pattern=_ENV)
    # Redis answers in well under a millisecond; the timeout only bites when it is hung or gone, and must also
    # cover a gateway whose event loop is busy (a burst on 2 cores delayed connects past 300 ms).
    timeout_ms: Annotated[float, Field(gt=0, le=10_000)] = 1000.0
    # Redis unreachable: serve on this replica's own state and say so (fail_open), or refuse what needs it
    # with 503 (fail_closed).
    on_failure: Literal["fail_open", "fail_closed"] = "fail_open"
    # How often a replica flushes its bandit updates and reads the merged state.
    sync_interval_s: Annotated[float, Field(gt=0, le=3600)] = 1.0


class TurnoutConfig(_Model):
    """The whole gateway config. Build it with `load_config`/`parse_config` to get the cross-checks."""

    workers: list[WorkerConfig] = Field(min_length=1)
    policies: dict[Annotated[str, Field(pattern=_NAME)], PolicySpec] = Field(default_factory=dict)
    default_policy: str | None = None
    upstream: UpstreamConfig = UpstreamConfig()
    server: ServerConfig = ServerConfig()
    embedder: EmbedderConfig = EmbedderConfig()
    auth: AuthConfig = AuthConfig()
    state: StateConfig = StateConfig()
    reliability: ReliabilityConfig = ReliabilityConfig()

    @cached_property
    def reference(self) -> tuple[str, Price]:
        """The model savings are counted against, and its price: `server.reference_model`, else the dearest model
        among generation workers (by the sum of its input and output prices; the first configured on a tie). Computed
        once per config: every request reads it."""
        if self.server.reference_model is not None:
            ref = next(w for w in self.workers if w.model == self.server.reference_model)
        else:  # among the models that answer completions (an embedding model is nobody's alternative to them)
            generating = [w for w in self.workers if w.kind == "generate"] or self.workers
            ref = max(generating, key=lambda w: w.price.input_per_1m + w.price.output_per_1m)
        return ref.model, ref.price

    def worker(self, name: str) -> WorkerConfig:
        """The worker called `name` (KeyError if none)."""
        for w in self.workers:
            if w.name == name:
                return w
        raise KeyError(name)
