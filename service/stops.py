"""Stop strings that never leak: text that could still turn into a stop string is held back until it resolves.
The hold-back is at most ``len(longest stop) - 1`` characters, and there is no limit on the number of stops."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, piece: str) -> tuple[str, str | None]:
        """Add newly generated text; return the text that is now safe to send, and the stop string if one
        completed (the text before it is returned, the stop string and anything after it are not)."""
        if not self.stops:
            return piece, None
        buf = self.held + piece
        found: tuple[int, str] | None = None
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0 and (found is None or i < found[0]):
                found = (i, stop)
        if found is not None:
            self.held = ""
            return buf[: found[0]], found[1]
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), hold, -1):
                if buf.endswith(stop[:k]):
                    hold = k
                    break
        self.held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        """The held-back text, released when generation ends without a stop string."""
        held, self.held = self.held, ""
        return held
