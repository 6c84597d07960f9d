"""Server-sent events: splitting a byte stream into events as they complete (never buffering a whole stream).
The response that relays them to the client is `server.api.responses.RelayResponse`."""

from __future__ import annotations

DONE = b"[DONE]"


class EventSplitter:
    """Splits an SSE byte stream into complete events (the bytes between blank lines)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add bytes; return the events completed by them, without their trailing blank line."""
        self._buf += chunk
        if b"\r" in self._buf:  # normalise CRLF/CR line endings, which the SSE spec allows
            # A trailing CR may be the first half of a CRLF split across chunks: keep it for later.
            held = self._buf.endswith(b"\r")
            body = self._buf[:-1] if held else self._buf
            self._buf = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        if b"\n\n" not in self._buf:
            return []
        *events, self._buf = self._buf.split(b"\n\n")
        return [e for e in events if e]

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet terminated."""
        return self._buf


def event_data(event: bytes) -> bytes | None:
    """The payload of an event's `data:` lines joined by newlines, or None if it has none (comments)."""
    lines = [ln[5:].lstrip(b" ") if ln.startswith(b"data:") else None for ln in event.split(b"\n")]
    data = [ln for ln in lines if ln is not None]
    return b"\n".join(data) if data else None
