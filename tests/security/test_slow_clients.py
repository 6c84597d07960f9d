"""Slow and huge clients (hardening from an outside review, items 5 and 6), against a gateway process on a real socket:
silent connections, dripped heads and trickled bodies are closed after their timeouts, an oversized head is a
431 without being stored, connections past `server.max_connections` are turned away at once, and requests that
keep to the limits (kept-alive connections idle between requests, a stream longer than every timeout) are
served as before. The limits are short here (1 to 2 s) so that the test is; every wait below has a generous
ceiling and never asserts a duration."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.api.responses import READ_GRACE_S
from tests.conftest import Upstream, fake_config, serve_gateway

LIMITS = {"header_timeout_s": 1.0, "body_idle_timeout_s": 1.0, "body_timeout_s": 2.0, "max_header_bytes": 8192,
          "max_connections": 12}
CEILING_S = 15.0  # far past every limit: a connection still open then was never going to be closed


@pytest.fixture(scope="module")
def gateway(fakes: dict[str, Upstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cfg = fake_config(fakes, server=LIMITS)
    proc, url = serve_gateway(cfg, Path(tmp_path_factory.mktemp("gw-slow-clients")))
    with proc:
        yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=CEILING_S)
    return sock


def until_closed(sock: socket.socket, drip: bytes = b"", every_s: float = 0.25) -> bytes:
    """Send `drip` every `every_s` (if any) and read until the gateway closes the connection; what it answered.
    Fails when the connection is still open after `CEILING_S`."""
    got = b""
    deadline = time.monotonic() + CEILING_S
    sock.settimeout(every_s)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if drip:
                try:
                    sock.sendall(drip)
                except (BrokenPipeError, ConnectionResetError):
                    return got
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    pytest.fail(f"the connection was still open after {CEILING_S} s (answered so far: {got[:80]!r})")


def test_a_silent_connection_is_closed(gateway: str) -> None:
    with connect(gateway) as sock:
        assert until_closed(sock) == b"", "nothing was asked, nothing is answered"


def test_a_dripped_head_is_a_408(gateway: str) -> None:
    with connect(gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        answer = until_closed(sock, drip=b"x-more: y\r\n")
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]


@pytest.mark.parametrize("every_s", [0.25, 1.5], ids=["trickled", "paused"])
def test_a_trickled_or_paused_body_is_a_408(gateway: str, every_s: float) -> None:
    """One byte every 0.25 s runs past the body's total time; a pause of 1.5 s past its idle limit."""
    with connect(gateway) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{")
        answer = until_closed(sock, drip=b" ", every_s=every_s)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]


def test_an_oversized_head_is_a_431(gateway: str) -> None:
    with connect(gateway) as sock:
        # Closed while we still send: the answer is in the socket's buffer all the same.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 1_000_000 + b"\r\n\r\n")
        answer = until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]


def test_pipelined_heads_are_each_counted_on_their_own(gateway: str) -> None:
    """Two requests of 5 KB heads each (the limit is 8 KiB), the second begun in the same read as the first:
    two 200s, not a 431 for the sum."""
    pad = b"x-pad: " + b"a" * 5000 + b"\r\n"
    first = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + pad + b"\r\n"
    second = b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + pad + b"\r\n"
    with connect(gateway) as sock:
        sock.sendall(first + second[:100])
        time.sleep(0.2)
        sock.sendall(second[100:])
        answer = until_closed(sock)
    assert answer.count(b"HTTP/1.1 200") == 2, answer[:200]


def test_connections_past_the_limit_are_turned_away_and_the_rest_served(gateway: str) -> None:
    """Twelve silent connections fill the limit: the next is answered 503 and closed (its descriptor is free
    again); once the silent ones are closed for their silence, `/healthz` is served."""
    held = [connect(gateway) for _ in range(12)]
    try:
        with connect(gateway) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:80]
        for sock in held:
            assert until_closed(sock) == b""
    finally:
        for sock in held:
            sock.close()
    assert httpx.get(f"{gateway}/healthz", timeout=CEILING_S).status_code == 200


def test_clients_within_the_limits_are_served(gateway: str) -> None:
    """A kept-alive connection idle for longer than the head's timeout between requests, and a stream that lasts
    longer than every limit, are served whole."""
    with httpx.Client(base_url=gateway, timeout=CEILING_S) as client:
        for _ in range(3):
            r = client.post("/v1/chat/completions", json={"model": "small", "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
            time.sleep(1.5)
        assert client.get("/healthz").status_code == 200
    sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    extra: dict[str, Any] = {"fake": {"itl_ms": 100}}
    stream = sdk.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=30, stream=True, extra_body=extra)
    chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
    assert len(chunks) == 30, "3 s of stream, past every limit, arrived whole"


def test_a_stream_its_client_does_not_read_is_cut_off(fakes: dict[str, Upstream], fake_reset: None,
                                                      tmp_path: Path) -> None:
    """Item 6: a client that asks for a long stream and never reads it blocks the gateway's writes, and with them
    its reads from the worker. The response is cut off `READ_GRACE_S` after the stream's total timeout: the
    worker's request is closed, the request counted as the client's."""
    # 4 s: time for the first event (10 MB, about 1 s on a busy machine) to arrive before the total timeout.
    cfg = fake_config(fakes, upstream={"total_timeout_s": 4.0}, server={"max_body_bytes": 16 * 1024 * 1024})
    proc, url = serve_gateway(cfg, tmp_path)
    # Ten megabytes in the first event block the gateway's writes at once (the kernel's buffers take at most a few);
    # the worker then goes on for 20 s, past the cut (14 s).
    body = json.dumps({"model": "small", "stream": True, "max_tokens": 2000, "messages": [
        {"role": "user", "content": "hi"}], "fake": {"itl_ms": 10, "reply": "x" * 10_000_000}}).encode()
    with proc:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the gateway's writes block
        sock.connect((host, int(port)))
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 4.0 + READ_GRACE_S + CEILING_S
            while time.monotonic() < deadline:  # the client reads nothing meanwhile
                stats = httpx.get(f"{fakes['fake-small'].root}/fake/stats", timeout=5).json()
                if stats["requests"] and not stats["active"]:
                    break
                time.sleep(0.5)
            else:
                pytest.fail(f"the worker's request was still open: {stats}")
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
        finally:
            sock.close()
    assert stats["cancelled"] == 1 and stats["completed"] == 0, stats
    assert 'status="client_disconnect"' in metrics
