"""Mapping of upstream failures to status codes and OpenAI error bodies."""

from __future__ import annotations

import orjson
import pytest

from server.errors import from_upstream_failure, from_upstream_status


def test_worker_4xx_keeps_status_and_message_in_openais_schema() -> None:
    """vLLM's exception name and integer code become OpenAI's type and a string code; the message stays."""
    body = orjson.dumps({"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                                   "param": "model", "code": 404}})
    err = from_upstream_status("w", 404, body)
    assert (err.status, err.message, err.param, err.type, err.code) == (
        404, "The model `x` does not exist.", "model", "invalid_request_error", "not_found")
    bad = from_upstream_status("w", 400, orjson.dumps({"error": {"message": "m", "type": "BadRequestError",
                                                                 "code": 400}}))
    assert (bad.type, bad.code) == ("invalid_request_error", "invalid_request")
    named = from_upstream_status("w", 400, orjson.dumps({"error": {"message": "m", "code": "context_too_long"}}))
    assert named.code == "context_too_long", "a string code is the worker's own word: kept"


def test_worker_4xx_with_flat_or_text_body() -> None:
    assert from_upstream_status("w", 400, b'{"message": "bad", "type": "x"}').message == "bad"
    err = from_upstream_status("w", 422, b"plain text problem")
    assert err.status == 422 and err.message == "plain text problem"
    assert from_upstream_status("w", 400, b"").message == "Worker 'w' answered 400."


def test_worker_5xx_is_502() -> None:
    err = from_upstream_status("w", 503, b'{"error": {"message": "overloaded"}}')
    assert err.status == 502 and err.code == "upstream_error" and "503" in err.message and "overloaded" in err.message


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [("unreachable", 502, "upstream_unreachable"), ("broken", 502, "upstream_unreachable"),
     ("timeout", 504, "upstream_timeout"), ("busy", 503, "gateway_busy")],
)
def test_upstream_failures(kind: str, status: int, code: str) -> None:
    err = from_upstream_failure(kind, "w")
    assert (err.status, err.code) == (status, code)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_worker_auth_failure_and_redirect_are_502() -> None:
    for status in (401, 403):
        err = from_upstream_status("w", status, b'{"error": {"message": "bad key"}}')
        assert err.status == 502 and err.code == "upstream_auth_failed"
    err = from_upstream_status("w", 302, b"")
    assert err.status == 502 and err.code == "upstream_error"


def test_worker_messages_are_not_logged() -> None:
    # A worker's message can quote the prompt; the log keeps only status and type.
    err = from_upstream_status("w", 400, b'{"error": {"message": "prompt SECRET too long", "type": "BadRequestError"}}')
    assert err.message == "prompt SECRET too long"
    assert "SECRET" not in err.log_message() and "400" in err.log_message()
    assert err.outcome == "worker_client_error"
