"""SSE splitting: events come out whole whatever the chunking of the byte stream."""

from __future__ import annotations

import random
from collections.abc import Iterator

from server.upstream.sse import EventSplitter, event_data

STREAM = b'data: {"a":1}\n\n: keep-alive comment\n\ndata: {"b":2}\n\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n'


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Every split into two chunks, then seeded random chunkings into many small pieces."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    rng = random.Random(1)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(2, 30)))
        yield [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def events_of(chunks: list[bytes]) -> list[bytes]:
    sp = EventSplitter()
    out = [e for c in chunks for e in sp.feed(c)]
    assert sp.pending == b""
    return out


def test_whole_stream() -> None:
    evs = events_of([STREAM])
    assert [event_data(e) for e in evs] == [b'{"a":1}', None, b'{"b":2}', b"line1\nline2", b"[DONE]"]


def test_every_chunking_gives_the_same_events() -> None:
    expected = events_of([STREAM])
    for chunks in splits(STREAM):
        assert events_of(chunks) == expected


def test_crlf_line_endings() -> None:
    evs = events_of([STREAM.replace(b"\n", b"\r\n")])
    assert [event_data(e) for e in evs] == [b'{"a":1}', None, b'{"b":2}', b"line1\nline2", b"[DONE]"]


def test_incomplete_event_stays_pending() -> None:
    sp = EventSplitter()
    assert sp.feed(b'data: {"a"') == []
    assert sp.pending == b'data: {"a"'
    assert sp.feed(b":1}\n\n") == [b'data: {"a":1}']


def test_data_without_space() -> None:
    assert event_data(b"data:[DONE]") == b"[DONE]"


def test_crlf_split_between_chunks_is_one_line_ending() -> None:
    data = b"data: a\r\ndata: b\r\n\r\n"
    for i in range(len(data) + 1):
        assert [event_data(e) for e in events_of([data[:i], data[i:]])] == [b"a\nb"], i
