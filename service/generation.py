"""A running generate call (``Generation``): its candidates (GenerateRequest.n, n independent continuations of one
prompt), its output as per-candidate items (``Output``: the form the transport takes every generation's output in;
n = 1 is one candidate, and a beam search reports its beams the same way) and its final messages (``Outcome``).

Candidate 0 is the request's own sequence, with the request's seed (given, or drawn); candidate i > 0 is a copy of
its context reseeded with ``candidate_seed(seed, i)``, so each is exactly the n = 1 request with its seed. The
engine runs the prompt once, for candidate 0, and copies the state after it to the others (service/engine.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.engine import Engine
from service.models import ServedModel
from service.sequence import Delta, Result, Sequence
from service.sessions import Session
from service.settings import ServerSettings
from textgen.errors import InvalidInputError
from textgen.sampling import candidate_seed

if TYPE_CHECKING:
    from service.app import GenerateSpec
    from service.beam_generate import BeamCall


@dataclass
class Generation:
    """A running generate call: its sequences (one per candidate, by index) and what must happen when it ends."""

    seqs: list[Sequence]
    engine: Engine
    spec: GenerateSpec
    session: Session | None = None
    ended: bool = False
    committed: bool = False
    settled: asyncio.Future[None] | None = None  # set while the final message is delivered (sessions only)
    reported: int = 0  # candidates whose final message has been built (``App.outcome``)
    beams: BeamCall | None = None  # a beam search (no sequences: it runs on the model's worker)

    @property
    def seq(self) -> Sequence:
        """Candidate 0 (the only one when n = 1)."""
        return self.seqs[0]

    @property
    def n(self) -> int:
        """Candidates it reports, each with its own final message (a beam search's: known when it ends)."""
        return len(self.seqs) if self.beams is None else self.beams.n

    @property
    def reads_session(self) -> bool:
        """Its session is read, never changed (n > 1, beam search)."""
        return self.n > 1 or self.beams is not None

    @property
    def multiple(self) -> bool:
        """Reported as candidates (GenerateResponse.candidates) rather than as one text."""
        return self.spec.n > 1 or self.spec.num_beams > 1

    @property
    def model(self) -> ServedModel:
        return self.engine.model


@dataclass
class Outcome:
    """A finished candidate as its final message reports it."""

    result: Result
    snapshot: bytes = b""
    session_id: str = ""
    index: int = 0  # the candidate it ends


@dataclass
class Output:
    """What one candidate produced since the last look (coalesced) and, with its last deltas, how it ended."""

    index: int
    deltas: list[Delta]
    result: Result | None = None


def candidates(settings: ServerSettings, n: int) -> int:
    """GenerateRequest.n checked against the server's limits (0 means 1). Every candidate holds a batch slot, so
    a request with more than the server can ever hold (its batch and queue together) is refused here too."""
    limit = settings.max_candidates
    if not 0 <= n <= limit:
        raise InvalidInputError(f"n: {n} candidates exceed this server's maximum of {limit}")
    room = settings.max_batch_size + settings.max_queue
    if n > room:
        raise InvalidInputError(f"n: {n} candidates exceed what this server can hold ({room}: batch and queue)")
    return max(n, 1)


def followers(leader: Sequence, n: int) -> list[Sequence]:
    """Candidates 1 .. n-1 of ``leader``'s request: its settings, a copy of its context (before anything ran)
    reseeded for each, and its wake-up event, so the transport waits on one event for all of them."""
    out = []
    for i in range(1, n):
        context = leader.context.copy()
        context.reseed(candidate_seed(leader.context.seed, i))
        constraint = leader.constraint and leader.constraint.copy()  # (each its own place in the pattern)
        seq = dataclasses.replace(leader, context=context, constraint=constraint)
        seq.event = leader.event
        out.append(seq)
    return out


async def follow(seqs: list[Sequence], wake: Callable[[], None]) -> AsyncIterator[list[Output]]:
    """The candidates' output as it comes: at each wake-up, an item per candidate with something new (its deltas
    since the last look, and its result with its last ones); ends after every candidate's result. ``wake`` tells
    the engine that a paused candidate's buffer has room again. The candidates share one event (``followers``)."""
    event = seqs[0].event
    assert event is not None
    running = dict(enumerate(seqs))
    while running:
        await event.wait()
        event.clear()
        items = []
        paused = False
        for index, seq in list(running.items()):
            deltas, result = seq.take()
            paused = paused or seq.paused
            if deltas or result is not None:
                items.append(Output(index, deltas, result))
            if result is not None:
                del running[index]
        if paused:
            wake()  # its buffer has room again
        if items:
            yield items
