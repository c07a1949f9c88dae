"""Admission of TextGeneration calls, shared by every transport (gRPC and the HTTP API): new calls are refused while
the server drains, and the calls in progress are bounded by max_concurrent_rpcs, whichever transport they came by."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from service.settings import ServerSettings
from textgen.errors import OverloadedError, UnavailableError


class Admission:
    def __init__(self, settings: ServerSettings, draining: Callable[[], bool]) -> None:
        self.settings = settings
        self._draining = draining
        self.in_progress = 0  # calls inside a handler, bounded by max_concurrent_rpcs

    def weight(self, n: int = 0, num_beams: int = 0) -> int:
        """How many calls in progress a call counts as: each candidate of a generate request (n) holds a stream
        buffer, paused or not, as a call does, so that max_concurrent_rpcs bounds the server's buffered memory
        whatever n is (an n over max_candidates is refused later, naming it)."""
        settings = self.settings
        n = 0 if num_beams > 1 else n
        return max(1, min(n, settings.max_concurrent_rpcs)) if n <= settings.max_candidates else 1

    def check_open(self, weight: int) -> None:
        if self._draining():
            raise UnavailableError("server is shutting down; retry on another replica")
        limit = self.settings.max_concurrent_rpcs
        if self.in_progress + weight > limit:
            counts = f"; this one counts {weight}, one per candidate" if weight > 1 else ""
            raise OverloadedError(
                f"server busy: {self.in_progress} calls in progress (limit {limit}{counts}); retry later"
            )

    @contextlib.contextmanager
    def hold(self, weight: int) -> Iterator[None]:
        """Admit a call of ``weight`` (or raise why not) for the duration of the block."""
        self.check_open(weight)
        self.in_progress += weight
        try:
            yield
        finally:
            self.in_progress -= weight
