"""Property-based fuzzing of a real gateway process with Schemathesis, from the gateway's own `/openapi.json`.

The gateway runs on a real port in front of the two fake workers, with client keys on (the fuzz key has a budget,
so every request also goes through admission) and the admin endpoints enabled. Schemathesis generates requests for
every operation of the schema, valid and invalid (wrong types, out-of-range numbers such as negative or huge
`max_tokens`, missing and unknown fields, wrong content types, undeclared methods), and holds every answer to the
schema: no 5xx, and a documented status, content type, headers and body. Generation is derandomized from a fixed
seed, so every run sends the same requests.

Two things Schemathesis does not send are sent here with the same checks on the answers: bodies that are not
valid JSON at all (truncated, invalid UTF-8, nested too deep, numbers beyond 64 bits), generated with Hypothesis;
and the requests that need a particular key or worker fault to get each documented error status (401, 403, 409,
413, 429, 502, 503, a worker's own 4xx, a stream broken off).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
import yaml
from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from schemathesis import Case, CheckFunction
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup, as_reported_failure
from schemathesis.core.result import Ok
from schemathesis.hooks import HookContext
from schemathesis.pytest.lazy import get_all_tests
from schemathesis.specs.openapi.schemas import OpenApiSchema

from server.quota.keys import hash_key
from testkit.procs import ManagedProcess, free_port
from tests.conftest import Upstream, fake_config, serve_gateway, start_fake

CLIENT_KEY = "tk-fuzz-client"
NARROW_KEY = "tk-fuzz-narrow"  # may use the `cheap` policy and the `small` worker only
SLOW_KEY = "tk-fuzz-slow"  # one request a minute
POOR_KEY = "tk-fuzz-poor"  # a budget of a tenth of a cent
ADMIN_ENV = "TURNOUT_FUZZ_ADMIN_KEY"
ADMIN_KEY = "fuzz-admin-key-long-enough-to-be-accepted"
CLIENT_HEADERS = {"authorization": f"Bearer {CLIENT_KEY}"}
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN_KEY}"}
MAX_BODY = 256 * 1024
#: Models that reach a worker; the fuzzer's own random names only ever reach the 404.
MODELS = ["auto", "turnout/cheap", "turnout/split", "small", "big", "fake-small", "fake-big"]
#: The pooling endpoints answer only the embedding model (the others are a 400 there).
POOLING = {"/v1/embeddings", "/v1/rerank", "/v1/score"}
POOLING_MODELS = ["fake-embed", "embed", "fake-small"]
#: Stored keys made before the fuzz, so that `DELETE /admin/keys/{name}` can also succeed.
STORED_KEYS = [f"fuzz-stored-{i}" for i in range(8)]
#: Every operation but `POST /admin/reload` (see `fuzz_schema`).
FUZZED = 21
#: Operations that cannot succeed here: vLLM cancels only background responses, which the gateway does not relay
#: (a synchronous one is the worker's 400, as the fake answers too).
NEVER_2XX = {"POST /v1/responses/{response_id}/cancel"}
SEED = 20_240_917
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


def _key(name: str, key: str, **rules: Any) -> dict[str, Any]:
    return {"name": name, "key_sha256": hash_key(key), **rules}


def gateway_config(fakes: dict[str, Upstream], dead_url: str, embed_url: str) -> dict[str, Any]:
    """The two fakes, a fake embedding (pooling) worker, and a worker that is never up (for the 503), behind a
    gateway with keys. The fuzz key's
    budget is far beyond what the fuzz spends: only an absurd worst case (huge `max_tokens` x `n`) gets a 429."""
    raw = fake_config(
        fakes,
        auth={"enabled": True, "keys": [_key("fuzz", CLIENT_KEY, budget_usd=1e9),
                                         _key("narrow", NARROW_KEY, policies=["cheap"], models=["small"]),
                                         _key("slow", SLOW_KEY, requests_per_minute=1),
                                         _key("poor", POOR_KEY, budget_usd=0.001)]},
        # A budget needs a bound on the answer; the fakes' context is 2,048 tokens, so keep the default small.
        server={"health_interval_s": 0.5, "admin_key_env": ADMIN_ENV, "default_max_tokens": 16,
                "max_body_bytes": MAX_BODY},
    )
    raw["workers"].append({"name": "dead", "model": "dead-model", "base_url": dead_url})
    raw["workers"].append({"name": "embed", "model": "fake-embed", "base_url": embed_url, "kind": "pooling",
                           "price": {"input_per_1m": 0.02}})
    raw["policies"]["doomed"] = {"type": "fixed", "worker": "dead"}
    return raw


def _wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        workers = httpx.get(f"{url}/readyz", timeout=5).json()["workers"]
        health = {name: w["health"] for name, w in workers.items()}
        if health == {"small": "up", "big": "up", "dead": "down", "embed": "up"}:
            return
        assert time.monotonic() < deadline, f"the workers never settled behind the gateway: {health}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def gateway_proc(fakes: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A gateway process with keys and admin endpoints on; fails at the end if it logged a traceback (a 500 is
    caught by the checks, an error in a background task such as a budget settle only here)."""
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    tmp = Path(tmp_path_factory.mktemp("fuzz"))
    embed = start_fake("fake-embed", tmp)
    embed_url = f"http://127.0.0.1:{embed.cmd[embed.cmd.index('--port') + 1]}/v1"
    proc, _ = serve_gateway(gateway_config(fakes, dead_url, embed_url), tmp)
    proc.env = {**(proc.env or {}), ADMIN_ENV: ADMIN_KEY}
    with embed, proc:
        _wait_ready(_url(proc))
        yield proc
    assert "Traceback" not in proc.log_text(), proc.log_text()[-5000:]


def _url(proc: ManagedProcess) -> str:
    return proc.ready_url.removesuffix("/healthz")


@pytest.fixture(scope="module")
def gateway(gateway_proc: ManagedProcess) -> str:
    """The gateway's base URL."""
    return _url(gateway_proc)


@pytest.fixture(scope="module")
def response_ids(gateway: str) -> list[str]:
    """Ids of stored Responses API responses made with the fuzz key, so that retrieving one can succeed."""
    with httpx.Client(base_url=gateway, timeout=30) as client:
        made = [client.post("/v1/responses", headers=CLIENT_HEADERS,
                            json={"model": model, "input": "hello there", "max_output_tokens": 2})
                for model in ("auto", "big")]
    assert all(r.status_code == 200 for r in made), [r.text for r in made]
    return [r.json()["id"] for r in made]


@pytest.fixture(scope="module")
def routed_ids(gateway: str) -> list[str]:
    """Request ids of real routed requests, so that feedback can hit one (a first score is accepted, later ones
    ignored); and the stored keys that revocations can hit."""
    ids = []
    with httpx.Client(base_url=gateway, timeout=30) as client:
        for model in ("auto", "turnout/split", "turnout/split", "auto"):
            r = client.post("/v1/chat/completions", headers=CLIENT_HEADERS, json={**CHAT, "model": model})
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-turnout-request-id"])
        for name in STORED_KEYS:
            r = client.post("/admin/keys", headers=ADMIN_HEADERS, json={"name": name})
            assert r.status_code == 201, r.text
    return ids


def fuzz_config() -> SchemathesisConfig:
    """Examples, coverage and fuzzing phases (not the stateful one); valid and invalid data; the checks that hold
    the gateway to its schema, plus 405 for undeclared methods and 4xx for data the schema rules out."""
    return SchemathesisConfig.from_dict({
        "seed": SEED,
        "suppress-health-check": ["too_slow", "filter_too_much"],
        "request-timeout": 30,
        "generation": {"mode": "all", "max-examples": 100, "deterministic": True, "database": "none",
                       "allow-x00": True},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
                   "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
        "checks": {
            "enabled": False,
            "not_a_server_error": {"enabled": True},
            "status_code_conformance": {"enabled": True},
            "content_type_conformance": {"enabled": True},
            "response_headers_conformance": {"enabled": True},
            "response_schema_conformance": {"enabled": True},
            "unsupported_method": {"enabled": True},
            "negative_data_rejection": {"enabled": True},
            "allow_header_conformance": {"enabled": True},
        },
    })


@pytest.fixture(scope="module")
def fuzz_schema(gateway: str, routed_ids: list[str], response_ids: list[str]) -> OpenApiSchema:
    """The running gateway's schema, minus `POST /admin/reload`, with hooks that steer part of the requests to what
    exists (models, routed request ids, stored keys) and to streaming, so the fuzz also reaches the workers and
    the 2xx answers; the rest keep the fuzzer's own values."""
    schema = schemathesis.openapi.from_url(f"{gateway}/openapi.json", config=fuzz_config())

    def flatmap_body(ctx: HookContext, body: Any) -> SearchStrategy[Any]:
        path = ctx.operation.path if ctx.operation is not None else ""
        if not isinstance(body, dict):
            return st.just(body)
        if path != "/v1/feedback" and isinstance(body.get("model"), str) and body["model"]:
            pooling = path in POOLING  # nothing streams there; the simplest draw (the example's) is the model served
            steer = st.tuples(st.sampled_from(POOLING_MODELS if pooling else [None, *MODELS]),
                              st.sampled_from([None] if pooling else [None, True]))
            return steer.map(lambda ms: {**body, **({"model": ms[0]} if ms[0] else {}),
                                         **({"stream": True} if ms[1] and "stream" not in body else {})})
        rid = body.get("request_id")
        if path == "/v1/feedback" and isinstance(rid, str) and 0 < len(rid) <= 200:
            return st.sampled_from([None, *routed_ids]).map(lambda i: body if i is None else {**body, "request_id": i})
        return st.just(body)

    def flatmap_path_parameters(ctx: HookContext, params: dict[str, Any] | None) -> SearchStrategy[Any]:
        if params is not None and isinstance(params.get("name"), str):
            return st.sampled_from([None, *STORED_KEYS]).map(lambda n: params if n is None else {"name": n})
        if params is not None and isinstance(params.get("response_id"), str):
            return st.sampled_from([None, *response_ids]).map(
                lambda r: params if r is None else {"response_id": r})
        return st.just(params)

    schema.hook(flatmap_body)
    schema.hook(flatmap_path_parameters)
    # `POST /admin/reload` re-reads the config file and starts a new generation whose workers' health starts over,
    # so the requests of the next moments would get 503s that say nothing about them; and a fuzzer has nothing to
    # vary in it (it takes no body). `test_reload_answers_match_the_schema` calls it instead.
    kept = schema.exclude(path="/admin/reload")
    assert isinstance(kept, OpenApiSchema)
    return kept


def _headers_for(path: str) -> dict[str, str]:
    """The admin key on the admin endpoints and, with client keys on, on the metrics and the status figures (which
    take it as the operations token); a client key elsewhere."""
    return ADMIN_HEADERS if path.startswith("/admin") or path in ("/metrics", "/ui/status.json") else CLIENT_HEADERS


ANSWERS: Counter[tuple[str, int]] = Counter()


def _call(case: Case[Any]) -> None:
    """One generated request, and the checks on its answer."""
    response = case.call_and_validate(headers=_headers_for(case.path))
    ANSWERS[(case.operation.label, response.status_code)] += 1


def test_every_answer_matches_the_schema(fuzz_schema: OpenApiSchema, subtests: pytest.Subtests) -> None:
    """No 5xx, and every answer (status, content type, headers, body) as `/openapi.json` documents it.

    Each operation runs Schemathesis's own test for it (its examples, coverage and fuzzing phases, built as its
    pytest plugin builds them), one subtest per operation. Not `schemathesis.pytest.from_fixture(...)` with
    `.parametrize()`, which does the same: with pytest 9.2 it fails before its first request (it sets
    `Function._nodeid`, which pytest no longer has).
    """
    ANSWERS.clear()
    schema = fuzz_schema.clone(test_function=_call)
    labels = []
    for result in get_all_tests(schema=schema, test_func=_call, settings=None, given_kwargs=None):
        assert isinstance(result, Ok), result.err()  # an operation the schema describes wrongly fails here
        operation, test = result.ok()
        labels.append(operation.label)
        with subtests.test(msg=operation.label):
            try:
                test()
            except FailureGroup as exc:
                raise as_reported_failure(exc) from None
    assert len(labels) == FUZZED, labels
    # The steering hooks work: every operation was also answered with success, not only with errors.
    succeeded = {label for (label, status), _ in ANSWERS.items() if 200 <= status < 300}
    assert succeeded == set(labels) - NEVER_2XX, sorted(ANSWERS.items())


# --- Bodies that are not JSON, or JSON the gateway cannot take --------------------------------------------------


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


#: Fields the gateway reads wherever they appear (admission reads `messages` and both token limits of any body).
EXTRA_FIELDS = [b"n", b"stream", b"stream_options", b"turnout", b"max_completion_tokens", b"messages", b"prompt"]


def _raw_bodies(valid: dict[str, Any]) -> SearchStrategy[bytes]:
    """Mostly-broken variants of a valid body: cut short, a byte made invalid UTF-8, a field holding something JSON
    parsers treat differently, or plain random bytes."""
    raw = orjson.dumps(valid)
    head = raw[:-1]  # the object without its closing brace, for appending a field
    odd_values = st.sampled_from([
        b"18446744073709551616", b"-9223372036854775809", b"1e400", b"-0", b"NaN", b"Infinity", b"1.0",
        b'"\\ud800"', b'"\\u0000"', b'"\xff\xfe"', b"true", b"null", b"{}", b"[]", b'"' + b"x" * 5000 + b'"',
    ])
    # Nesting past what orjson writes (254) and past what it reads (1024), under a field the gateway forwards and
    # a keyed request's admission measures (`tools`), and under an unknown one.
    deep = st.tuples(st.sampled_from([b"tools", b"extra"]), st.integers(200, 1100))
    odd_field = st.tuples(st.sampled_from([k.encode() for k in valid] + EXTRA_FIELDS), odd_values).map(
        lambda kv: head + b',"' + kv[0] + b'":' + kv[1] + b"}")
    return st.one_of(
        odd_field,
        odd_field,  # twice as likely: the gateway reads these fields, so what they hold matters most
        st.integers(0, len(raw) - 1).map(lambda i: raw[:i]),
        st.tuples(st.integers(0, len(raw) - 1), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])).map(
            lambda t: raw[:t[0]] + t[1] + raw[t[0] + 1:]),
        deep.map(lambda kd: head + b',"' + kd[0] + b'":' + _nested(kd[1]) + b"}"),
        st.sampled_from([b"", b" ", b"[]", b"null", b'"x"', b"1", b"\xef\xbb\xbf{}", raw + raw, raw + b"garbage"]),
        st.binary(max_size=64),
    )


POST_BODIES = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": {"model": "auto", "prompt": "hello there", "max_tokens": 4},
    "/v1/responses": {"model": "auto", "input": "hello there", "max_output_tokens": 4},
    "/v1/messages": {"model": "auto", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4},
    "/v1/route": CHAT,
    "/v1/feedback": {"request_id": "0" * 32, "score": 0.5},
    "/admin/keys": {"name": "fuzz-raw", "requests_per_minute": 5},
}


def _validate(schema: OpenApiSchema, method: str, path: str, response: httpx.Response, *,
              server_error: bool = False) -> None:
    """Schemathesis's checks on an answer to a request made here: a documented status, type, headers and body,
    and no 5xx unless `server_error` (a worker fault the request was made to cause)."""
    case = schema[path][method].Case()
    excluded: list[CheckFunction] = [not_a_server_error] if server_error else []
    try:
        case.validate_response(response, headers=dict(response.request.headers), excluded_checks=excluded)
    except FailureGroup as exc:
        raise as_reported_failure(exc) from None


@pytest.mark.parametrize("path", list(POST_BODIES))
def test_bodies_that_are_not_json_get_a_documented_4xx(fuzz_schema: OpenApiSchema, gateway: str, path: str) -> None:
    """Whatever the bytes, a 2xx or a documented 4xx, never a 5xx or an undocumented answer."""
    with httpx.Client(base_url=gateway, timeout=30, headers=_headers_for(path)) as client:

        @settings(max_examples=100, derandomize=True, database=None, deadline=None)
        @given(body=_raw_bodies(POST_BODIES[path]))
        def check(body: bytes) -> None:
            note(f"body: {body[:300]!r}")
            response = client.post(path, content=body, headers={"content-type": "application/json"})
            _validate(fuzz_schema, "POST", path, response)

        check()


# --- Each documented error status, by the key or the worker fault that causes it -------------------------------

SCENARIOS: list[tuple[str, str, str, dict[str, str], Any, int]] = [
    # (what, method, path, headers, JSON body or raw bytes, expected status)
    ("no key", "POST", "/v1/chat/completions", {}, CHAT, 401),
    ("unknown key", "POST", "/v1/completions", {"authorization": "Bearer tk-nobody"},
     {"model": "auto", "prompt": "x"}, 401),
    ("no key, route", "POST", "/v1/route", {}, CHAT, 401),
    ("no key, feedback", "POST", "/v1/feedback", {}, {"request_id": "x", "score": 1}, 401),
    ("client key on admin", "GET", "/admin/keys", CLIENT_HEADERS, None, 401),
    ("client key on admin, add", "POST", "/admin/keys", CLIENT_HEADERS, {"name": "x"}, 401),
    ("client key on admin, revoke", "DELETE", "/admin/keys/x", CLIENT_HEADERS, None, 401),
    ("policy not allowed", "POST", "/v1/chat/completions", {"authorization": f"Bearer {NARROW_KEY}"},
     {**CHAT, "model": "turnout/split"}, 403),
    ("policy not allowed, route", "POST", "/v1/route", {"authorization": f"Bearer {NARROW_KEY}"},
     {**CHAT, "model": "turnout/split"}, 403),
    ("model not allowed", "POST", "/v1/completions", {"authorization": f"Bearer {NARROW_KEY}"},
     {"model": "big", "prompt": "x"}, 403),
    ("unknown model", "POST", "/v1/chat/completions", CLIENT_HEADERS, {**CHAT, "model": "nope"}, 404),
    ("unknown policy", "POST", "/v1/route", CLIENT_HEADERS, {**CHAT, "model": "turnout/nope"}, 404),
    ("unknown request id", "POST", "/v1/feedback", CLIENT_HEADERS, {"request_id": "nope", "score": 1}, 404),
    ("config key cannot be revoked", "DELETE", "/admin/keys/fuzz", ADMIN_HEADERS, None, 404),
    ("name of a config key", "POST", "/admin/keys", ADMIN_HEADERS, {"name": "fuzz"}, 409),
    ("body too large", "POST", "/v1/chat/completions", CLIENT_HEADERS,
     {**CHAT, "pad": "x" * MAX_BODY}, 413),
    ("body too large, feedback", "POST", "/v1/feedback", CLIENT_HEADERS,
     {"request_id": "x" * 70_000, "score": 1}, 413),
    ("body too large, keys", "POST", "/admin/keys", ADMIN_HEADERS, {"name": "big", "pad": "x" * 70_000}, 413),
    ("worst case over the budget", "POST", "/v1/chat/completions", {"authorization": f"Bearer {POOR_KEY}"},
     {**CHAT, "model": "big", "max_tokens": 1000}, 429),
    ("worker answers 500", "POST", "/v1/chat/completions", CLIENT_HEADERS,
     {**CHAT, "model": "small", "fake": {"status": 500}}, 502),
    ("worker answers 418", "POST", "/v1/completions", CLIENT_HEADERS,
     {"model": "big", "prompt": "x", "fake": {"status": 418}}, 418),
    ("worker refuses the request", "POST", "/v1/chat/completions", CLIENT_HEADERS,
     {**CHAT, "max_tokens": 5000}, 400),
    # Panic mode: a model whose only worker is down is tried all the same (and found unreachable); /v1/route
    # decides for it and lists it as unavailable.
    ("no healthy worker, tried in panic", "POST", "/v1/chat/completions", CLIENT_HEADERS, {**CHAT, "model": "dead"},
     502),
    ("no healthy worker, route", "POST", "/v1/route", CLIENT_HEADERS, {**CHAT, "model": "turnout/doomed"}, 200),
    ("stream broken off by the worker", "POST", "/v1/chat/completions", CLIENT_HEADERS,
     {**CHAT, "stream": True, "fake": {"drop_after": 2}}, 200),
    ("stream with usage", "POST", "/v1/completions", CLIENT_HEADERS,
     {"model": "auto", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}, 200),
    ("direct model, route", "POST", "/v1/route", CLIENT_HEADERS, {**CHAT, "model": "big"}, 200),
]


def test_every_error_status_matches_the_schema(fuzz_schema: OpenApiSchema, gateway: str,
                                               subtests: pytest.Subtests) -> None:
    """The answers a fuzzer cannot reach with the fuzz key and healthy workers, held to the same checks."""
    with httpx.Client(base_url=gateway, timeout=30) as client:
        for what, method, path, headers, body, status in SCENARIOS:
            with subtests.test(msg=what):
                content = body if isinstance(body, bytes) else None if body is None else orjson.dumps(body)
                response = client.request(method, path, headers={"content-type": "application/json", **headers},
                                          content=content)
                assert response.status_code == status, response.text
                template = "/admin/keys/{name}" if path.startswith("/admin/keys/") else path
                _validate(fuzz_schema, method, template, response, server_error=status >= 500)
        with subtests.test(msg="over requests per minute"):
            # One request a minute, in windows aligned to the clock: the second request is refused, or the third
            # when the first two fell on either side of a minute's end.
            statuses: list[int] = []
            while 429 not in statuses:
                assert len(statuses) < 3, statuses
                response = client.post("/v1/completions", headers={"authorization": f"Bearer {SLOW_KEY}"},
                                       json={"model": "small", "prompt": "x", "max_tokens": 1})
                _validate(fuzz_schema, "POST", "/v1/completions", response)
                statuses.append(response.status_code)
            assert set(statuses[:-1]) == {200}, statuses


def test_reload_answers_match_the_schema(fuzz_schema: OpenApiSchema, gateway_proc: ManagedProcess) -> None:
    """`POST /admin/reload`, left out of the fuzz: refused (401), rejected with every problem listed (400), done
    (200). The last test of the module: a reload starts the workers' health over."""
    url = _url(gateway_proc)
    config = Path(gateway_proc.cmd[gateway_proc.cmd.index("--config") + 1])
    good = config.read_text()
    raw = yaml.safe_load(good)
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/admin/reload", headers=CLIENT_HEADERS)
        assert r.status_code == 401, r.text
        _validate(fuzz_schema, "POST", "/admin/reload", r)
        try:
            config.write_text(yaml.safe_dump({**raw, "default_policy": "nope", "workers": []}))
            r = client.post("/admin/reload", headers=ADMIN_HEADERS)
            assert r.status_code == 400, r.text
            assert len(r.json()["error"]["problems"]) >= 2
            _validate(fuzz_schema, "POST", "/admin/reload", r)
        finally:
            config.write_text(good)
        r = client.post("/admin/reload", headers=ADMIN_HEADERS)
        assert r.status_code == 200, r.text
        _validate(fuzz_schema, "POST", "/admin/reload", r)
