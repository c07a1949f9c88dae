"""How the engine thread tells the transport that a sequence has output: once per step and event loop, not once
per sequence (a cross-thread wake-up costs a socket write and the GIL)."""

from __future__ import annotations

import asyncio
import contextlib

from service.sequence import Sequence


class Wakes:
    """Sequences with new output in this step, grouped by the event loop that follows them."""

    def __init__(self) -> None:
        self._by_loop: dict[asyncio.AbstractEventLoop, list[Sequence]] = {}

    def add(self, seq: Sequence) -> None:
        if seq.loop is not None:
            self._by_loop.setdefault(seq.loop, []).append(seq)
        elif seq.on_ready is not None:  # a loop-less consumer (tests, benchmarks): called on the engine thread
            seq.on_ready()

    def flush(self) -> None:
        for loop, seqs in self._by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_set_events, seqs)
        self._by_loop = {}


def _set_events(seqs: list[Sequence]) -> None:
    for s in seqs:
        if s.event is not None:
            s.event.set()
