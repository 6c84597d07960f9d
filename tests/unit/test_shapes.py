"""The three relayed APIs' streams as `server.upstream.shapes` reads them: the final event, the usage (and
Anthropic's, split over two events), the worker's own error events, a Responses stream's id, answer text, and the
events the gateway ends a broken stream with, which each API's SDK parses."""

from __future__ import annotations

import orjson

from server.errors import upstream_stream_error
from server.telemetry.record import usage_tokens
from server.upstream.shapes import CHAT, MESSAGES, RESPONSES, answer_texts


def data(obj: object) -> bytes:
    return orjson.dumps(obj)


def test_chat_ends_on_done_and_reads_its_usage_chunk() -> None:
    assert CHAT.read(b"[DONE]", False).end
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    seen = CHAT.read(data({"choices": [], "usage": usage}), False)
    assert seen.usage == usage and seen.usage_only and not seen.end
    assert CHAT.read(data({"choices": [{"delta": {"content": "hi"}}]}), True).texts == ("hi",)
    assert not CHAT.read(data({"choices": [{"delta": {"content": "hi"}}]}), False).texts, "text only when asked"
    assert CHAT.read(data({"error": {"message": "x"}}), False).failed


def test_responses_end_on_their_terminal_events_with_the_usage_of_the_response() -> None:
    created = RESPONSES.read(data({"type": "response.created", "response": {"id": "resp_1", "usage": None}}), False)
    assert created.response_id == "resp_1" and not created.end
    usage = {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}
    for kind in ("response.completed", "response.incomplete", "response.failed"):
        seen = RESPONSES.read(data({"type": kind, "response": {"id": "resp_1", "usage": usage}}), False)
        assert seen.end and seen.usage == usage and seen.failed == (kind == "response.failed")
    assert RESPONSES.read(data({"type": "error", "code": "x", "message": "y"}), False).failed
    delta = data({"type": "response.output_text.delta", "delta": "tok"})
    assert RESPONSES.read(delta, True).texts == ("tok",) and not RESPONSES.read(delta, False).texts
    # A delta whose text quotes an event's name is text, not that event.
    assert not RESPONSES.read(data({"type": "response.output_text.delta", "delta": '"response.completed"'}),
                              False).end


def test_messages_take_input_tokens_from_the_start_and_end_on_message_stop() -> None:
    start = MESSAGES.read(data({"type": "message_start", "message": {"usage": {"input_tokens": 9,
                                                                              "output_tokens": 0}}}), False)
    assert start.usage == {"input_tokens": 9, "output_tokens": 0} and not start.usage_final
    final = MESSAGES.read(data({"type": "message_delta", "usage": {"output_tokens": 5}}), False)
    assert final.usage == {"output_tokens": 5} and final.usage_final
    assert MESSAGES.read(data({"type": "message_stop"}), False).end
    assert MESSAGES.read(data({"type": "error", "error": {"type": "overloaded_error", "message": "x"}}), False).failed
    text = data({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "tok"}})
    assert MESSAGES.read(text, True).texts == ("tok",)


def test_usage_in_every_apis_tokens() -> None:
    assert usage_tokens({"prompt_tokens": 3, "completion_tokens": 2}) == (3, 2)
    assert usage_tokens({"prompt_tokens": 3, "total_tokens": 3}) == (3, 0), "an embedding's"
    assert usage_tokens({"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}) == (4, 2)
    # Anthropic leaves cached prompt tokens out of input_tokens: they are prompt tokens all the same.
    assert usage_tokens({"input_tokens": 4, "cache_read_input_tokens": 10, "cache_creation_input_tokens": 1,
                         "output_tokens": 2}) == (15, 2)


def test_a_broken_stream_ends_with_each_apis_own_error_event() -> None:
    err = upstream_stream_error("w", "the connection was reset")
    chat = CHAT.failure(err, b"")
    assert chat.endswith(b"data: [DONE]\n\n")
    assert orjson.loads(chat.split(b"\n\n")[0].removeprefix(b"data: "))["error"]["code"] == "upstream_stream_error"
    responses = RESPONSES.failure(err, data({"type": "response.output_text.delta", "sequence_number": 7}))
    name, payload = responses.rstrip(b"\n").split(b"\n")
    event = orjson.loads(payload.removeprefix(b"data: "))
    assert name == b"event: error" and event["type"] == "error" and event["sequence_number"] == 8
    assert event["code"] == "upstream_stream_error" and "reset" in event["message"]
    messages = MESSAGES.failure(err, b"")
    name, payload = messages.rstrip(b"\n").split(b"\n")
    assert name == b"event: error"
    assert orjson.loads(payload.removeprefix(b"data: ")) == {
        "type": "error", "error": {"type": "api_error", "message": err.message}}


def test_answer_text_of_each_apis_whole_answer() -> None:
    assert answer_texts({"choices": [{"message": {"content": "a"}}, {"text": "b"}]}) == ["a", "b"]
    assert answer_texts({"object": "response", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": "c"}, {"type": "refusal"}]}]}) == ["c"]
    assert answer_texts({"type": "message", "content": [{"type": "text", "text": "d"},
                                                        {"type": "tool_use", "name": "f"}]}) == ["d"]
