"""Server-sent events as a client reads them (the WHATWG event-stream format), for the HTTP side of ``textgen bench
serve --http``: bytes in as they arrive, each complete event's data out. Written here rather than taken from a
library because the well-kept SSE clients wrap httpx, and the benchmark's client is aiohttp (its C parser keeps the
client's share of the two cores small); the format is a few lines, and the tests hold it to the server's output."""

from __future__ import annotations


class EventParser:
    """Feed it chunks of a stream; it returns the ``data`` of every event the chunk completes. An event ends at a
    blank line; its ``data:`` lines are joined with newlines (one space after the colon dropped), comments
    (``:`` lines) and other fields (event, id, retry) are ignored, and an event without data is not dispatched.
    Lines end in LF or CRLF (CR alone, which the format also allows, is not handled: no server here sends it)."""

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()  # an incomplete last line waits for the next chunk
        events = []
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            field, _, value = line.partition(b":")
            if field == b"data":
                self._data.append((value[1:] if value.startswith(b" ") else value).decode())
        return events
