"""One unit of work in the engine (a generation or a scoring pass) and what it hands back to the transport:
text deltas and a final result, through a thread-safe outbox the gRPC handler drains."""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from service.context import Context
from service.stops import StopMatcher
from textgen.errors import TextgenError
from textgen.sampling import SamplingParams

if TYPE_CHECKING:
    from service.constraints import Cursor
    from service.models import State

_ids = itertools.count(1)


class Phase(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


class Finish(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    SLOW_READER = "slow_reader"  # its client stopped reading for longer than the pause limit


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[TokenLogprob, ...] = ()  # the most likely tokens at its position, when top_logprobs was asked


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob]
    tokens: int  # tokens behind this delta (for the stream buffer bound)
    token: int = -1  # the id of the token behind it


@dataclass
class Result:
    """How a sequence ended, for the final message."""

    finish: Finish | None = None
    stop: str = ""
    stop_token: int = -1  # the stop token (GenerateRequest.stop_token_ids) that ended it, if one did
    cumulative_logprob: float | None = None  # its generated tokens' summed log-probability, where kept
    beam_score: float | None = None  # beam search: the beam's score (service/beam_search.py)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seed: int = 0
    context: Context | None = None  # the context after the generation (None if it failed)
    error: TextgenError | None = None
    queue_seconds: float = 0.0
    prompt_seconds: float = 0.0
    first_token_seconds: float = 0.0
    total_seconds: float = 0.0
    # scoring only
    score_logprobs: np.ndarray | None = None
    score_targets: np.ndarray | None = None


@dataclass(eq=False)  # identity semantics: the engine keeps sequences in lists and compares them often
class Sequence:
    """Created by the transport, run by the engine thread, drained by the transport again."""

    context: Context
    feed: np.ndarray  # tokens to run before sampling (the prompt, with any pending token first)
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 0
    stops: list[str] = field(default_factory=list)
    logprobs: bool = False
    deadline: float | None = None  # time.monotonic() value
    score_targets: np.ndarray | None = None  # a scoring pass: log-probability of targets[i] after feed[: i + 1]
    loop: asyncio.AbstractEventLoop | None = None  # the transport's loop, woken when output is ready
    on_ready: Callable[[], None] | None = None  # or a plain callback (engine thread), for loop-less consumers
    keep_context: bool = True  # its final context is wanted (a session, a snapshot): copy its state row out
    token_ids: bool = False  # its client wants every token's id, even while the token's text is held back
    top_logprobs: int = 0  # alternatives per position to report (implies logprobs)
    stop_ids: frozenset[int] = frozenset()  # sampling one of these ends it (finish STOP, its text not sent)
    sum_logprobs: bool = False  # keep its generated tokens' summed log-probability (n > 1; logprobs implies it)
    constraint: Cursor | None = None  # GenerateRequest.regex, .choices: where its text stands (service.constraints)

    def __post_init__(self) -> None:
        self.id = next(_ids)
        self.phase = Phase.WAITING
        self.arrived = time.monotonic()
        self.admitted = 0.0
        self.first_token = 0.0
        self.last_token = 0.0  # when its latest token was sampled
        self.fed = 0  # tokens of ``feed`` already run
        self.next_token = -1  # sampled, to be fed at the next decode step
        self.previous = int(self.feed[-1]) if self.feed.size else None  # for word-level spacing
        self.generated = 0
        self.stop_token = -1  # the stop id that ended it
        # Constrained decoding, with a context to keep: its state before the token its next step feeds, while its
        # text matches (a token that leaves the pattern then ends it there, with that token pending).
        self.state_before: State | None = None
        # Rows whose chosen token's log-probability the output processor computes: to report it, or to sum it.
        self.tracks_logprob = self.logprobs or self.sum_logprobs
        self.cumulative_logprob = 0.0
        # Candidates (GenerateRequest.n): the other candidates of its request, waiting for its prompt to run (the
        # engine then gives each a copy of its state), and, for such a candidate, that prompt's last logits row,
        # from which it samples its first token without a graph call of its own.
        self.followers: list[Sequence] = []
        self.first_logits: np.ndarray | None = None
        # How often each token was generated by this request (float32: the sampler's penalty arithmetic), kept
        # only when a presence or frequency penalty reads it.
        self.counts = np.zeros(self.context.seen.size, np.float32) if self.params.penalises else None
        # A resumed stream (service/resume.py): generated tokens at the end of ``feed``, the last received token
        # (fed by the first decode step instead of a sampled one), and the ending it had already reached, if any.
        self.replayed = 0
        self.resume_token = -1
        self.resume_ending: tuple[Finish, str] | None = None
        self.paused = False  # out of the decode batch: its stream buffer is full, or it waits for a slot again
        self.paused_since = 0.0  # when its buffer last filled up (0: not full); the pause limit counts from here
        self.ready_since = 0.0  # paused, when its reader made room again (0: not waiting for a slot)
        self.counted = False  # counts against max_batch_size (admitted and not paused), slot or not yet
        self.holds_slot = False  # its state is in a slot of the batch state
        self.slot = -1  # while it holds one: its row of the device-resident batch state
        self.cancel_reason: TextgenError | None = None
        self.own_state = self.context.state  # the state (host) while it holds no slot: before admission, paused
        self.stop_matcher = StopMatcher(self.stops)
        self.outbox: deque[Delta] = deque()
        # Tokens put in / taken out of the outbox; each counter has one writer thread, so no lock is needed.
        self.produced_tokens = 0
        self.consumed_tokens = 0
        self.result: Result | None = None
        self.event = asyncio.Event() if self.loop is not None else None
        self.prompt_seconds = 0.0
        self.score_parts: list[np.ndarray] = []

    def ending(self, finish: Finish | None, stop: str, error: TextgenError | None, context: Context | None) -> Result:
        """The result this sequence ends with (built by the engine when it retires it)."""
        now = time.monotonic()
        result = Result(
            finish=finish if error is None else None,
            stop=stop,
            stop_token=self.stop_token,
            cumulative_logprob=self.cumulative_logprob if self.tracks_logprob else None,
            prompt_tokens=int(self.feed.size) - self.replayed,
            generated_tokens=self.generated,
            seed=self.context.seed,
            context=context,
            error=error,
            queue_seconds=(self.admitted or now) - self.arrived,
            prompt_seconds=self.prompt_seconds,
            first_token_seconds=(self.first_token - self.arrived) if self.first_token else 0.0,
            total_seconds=now - self.arrived,
        )
        if self.score and error is None:
            result.score_logprobs = np.concatenate(self.score_parts) if self.score_parts else np.zeros(0)
        return result

    # -- transport side ------------------------------------------------------------------------------------
    def cancel(self, reason: TextgenError) -> None:
        """Ask the engine to retire this sequence at its next step (thread-safe: a single attribute write)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def take(self) -> tuple[list[Delta], Result | None]:
        """Everything produced since the last call (the deltas are coalesced by the caller)."""
        result = self.result  # read first: every delta is queued before the result is set
        out = []
        while self.outbox:
            d = self.outbox.popleft()
            self.consumed_tokens += d.tokens
            out.append(d)
        return out, result

    @property
    def buffered_tokens(self) -> int:
        return self.produced_tokens - self.consumed_tokens

    @property
    def score(self) -> bool:
        return self.score_targets is not None

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE
