"""The fake worker's answers on the Responses API and Anthropic's Messages API, shaped as vLLM 0.32 answers them:
whole answers, and streams of named events (`event: <type>` then `data: <json>`).

Responses: `response.created`, `response.in_progress`, `response.output_item.added`, `response.content_part.added`,
one `response.output_text.delta` per token, the matching `.done` events and `response.completed` with the usage.
Messages: `message_start` (input tokens), `content_block_start`, one `content_block_delta` per token,
`content_block_stop`, `message_delta` (stop reason and usage, input and output tokens, as vLLM sends it),
`message_stop`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from testkit.fakes.worker_protocol import CompletionJob


def named_event(kind: str, payload: dict[str, Any]) -> bytes:
    """One server-sent event with its name: ``event: <kind>`` and its JSON data."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _message_item(job: CompletionJob, text: str, status: str) -> dict[str, Any]:
    return {"id": "msg_" + job.answer_id[5:], "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]}


def response_object(job: CompletionJob, text: str, status: str = "completed") -> dict[str, Any]:
    """A Responses API `response` (with its usage once completed)."""
    done = status == "completed"
    obj: dict[str, Any] = {
        "id": job.answer_id, "object": "response", "created_at": int(time.time()), "model": job.model,
        "status": status, "output": [_message_item(job, text, status)] if done else [],
        "incomplete_details": None, "error": None, "instructions": None, "metadata": None,
        "parallel_tool_calls": True, "temperature": None, "tool_choice": "auto", "tools": [], "top_p": None,
        "max_output_tokens": job.completion_tokens, "previous_response_id": job.previous_response_id,
        "usage": None,
    }
    if done and not job.faults.no_usage:
        obj["usage"] = {"input_tokens": job.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": job.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": job.prompt_tokens + job.completion_tokens}
    return obj


def message_object(job: CompletionJob, text: str) -> dict[str, Any]:
    """An Anthropic `message`."""
    obj: dict[str, Any] = {"id": job.answer_id, "type": "message", "role": "assistant", "model": job.model,
                           "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens",
                           "stop_sequence": None}
    if not job.faults.no_usage:
        obj["usage"] = {"input_tokens": job.prompt_tokens, "output_tokens": job.completion_tokens}
    return obj


def responses_frames(job: CompletionJob, text: str, piece: str) -> tuple[bytes, list[bytes], bytes]:
    """(head, one delta per token, tail) of a streamed Responses answer; `text` is the whole answer."""
    seq = iter(range(1_000_000))
    item = _message_item(job, "", "in_progress")
    part = {"type": "output_text", "text": "", "annotations": []}
    head = (named_event("response.created", {"type": "response.created", "sequence_number": next(seq),
                                             "response": response_object(job, "", "in_progress")})
            + named_event("response.in_progress", {"type": "response.in_progress", "sequence_number": next(seq),
                                                   "response": response_object(job, "", "in_progress")})
            + named_event("response.output_item.added", {"type": "response.output_item.added", "output_index": 0,
                                                         "sequence_number": next(seq), "item": item})
            + named_event("response.content_part.added", {"type": "response.content_part.added",
                                                          "item_id": item["id"], "output_index": 0,
                                                          "content_index": 0, "sequence_number": next(seq),
                                                          "part": part}))
    first = [] if job.faults.reply is None else [job.faults.reply]
    deltas = [named_event("response.output_text.delta", {
        "type": "response.output_text.delta", "item_id": item["id"], "output_index": 0, "content_index": 0,
        "delta": (first[0] if first and i == 0 else piece), "logprobs": [], "sequence_number": next(seq)})
        for i in range(job.completion_tokens)]
    done_part = {**part, "text": text}
    tail = (named_event("response.output_text.done", {"type": "response.output_text.done", "item_id": item["id"],
                                                      "output_index": 0, "content_index": 0, "text": text,
                                                      "logprobs": [], "sequence_number": next(seq)})
            + named_event("response.content_part.done", {"type": "response.content_part.done",
                                                         "item_id": item["id"], "output_index": 0,
                                                         "content_index": 0, "sequence_number": next(seq),
                                                         "part": done_part})
            + named_event("response.output_item.done", {"type": "response.output_item.done", "output_index": 0,
                                                        "sequence_number": next(seq),
                                                        "item": _message_item(job, text, "completed")})
            + named_event("response.completed", {"type": "response.completed", "sequence_number": next(seq),
                                                 "response": response_object(job, text)}))
    return head, deltas, tail


def messages_frames(job: CompletionJob, piece: str) -> tuple[bytes, bytes, bytes]:
    """(head, the per-token delta, tail) of a streamed Messages answer."""
    start = {"type": "message_start", "message": {
        "id": job.answer_id, "type": "message", "role": "assistant", "content": [], "model": job.model,
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": job.prompt_tokens, "output_tokens": 0}}}
    reply = job.faults.reply
    head = (named_event("message_start", start)
            + named_event("content_block_start", {"type": "content_block_start", "index": 0,
                                                  "content_block": {"type": "text", "text": ""}}))
    if reply:
        head += named_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                    "delta": {"type": "text_delta", "text": reply}})
    token = named_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                "delta": {"type": "text_delta", "text": piece}})
    delta: dict[str, Any] = {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None}}
    if not job.faults.no_usage:
        delta["usage"] = {"input_tokens": job.prompt_tokens, "output_tokens": job.completion_tokens}
    tail = (named_event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + named_event("message_delta", delta) + named_event("message_stop", {"type": "message_stop"}))
    return head, token, tail
