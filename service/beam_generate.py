"""Beam search as a Generate call (GenerateRequest.num_beams > 1): its fields checked, its search
(``service.beam_search``) run on the model's worker (``service.workers``, shared with Predict: the bounded queue,
deadlines and cancellation checked before every graph call, shutdown), its beams reported as candidates, best
first (``Output.index`` is the rank), when the search ends: a beam search has no text to stream before.

A session is read, never changed (as with n > 1), and held busy for the call; a snapshot is a context to start
from like a prompt. Each returned beam may carry a snapshot of the context after its text, its last token pending,
as Generate leaves one. The call costs at most ``max_tokens`` graph calls of at most ``num_beams`` rows after its
context, all bounded before it starts (num_beams by max_beams, max_tokens by max_tokens_limit)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service import validation
from service.beam_search import Beam, BeamParams, search_from
from service.context import Context
from service.generation import Output
from service.models import ServedModel
from service.output import TokenText
from service.sequence import Delta, Result
from service.settings import ServerSettings
from service.workers import Job, ModelWorkers, run_context
from textgen.errors import CancelledError, InvalidInputError
from textgen.sampling import SamplingParams

if TYPE_CHECKING:
    from service.app import GenerateSpec

MAX_LENGTH_PENALTY = 10.0

# Fields a beam search refuses, with why: it ranks continuations deterministically (nothing is sampled), and its
# beams arrive only when it ends (nothing to resume).
_REFUSED = (
    ("temperature", "beam search ranks log-probabilities at temperature 1; nothing is sampled"),
    ("top_k", "beam search samples nothing"),
    ("top_p", "beam search samples nothing"),
    ("min_p", "beam search samples nothing"),
    ("seed", "beam search is deterministic"),
    ("regex", "not with beam search (yet)"),
    ("choices", "not with beam search (yet)"),
    ("resume", "a beam search sends its text only when it ends: repeat the request"),
)


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    n: int  # beams returned
    length_penalty: float
    early_stopping: bool
    chunk: int  # context tokens per graph call (the server's prefill_chunk_tokens)


def beam_settings(spec: GenerateSpec, settings: ServerSettings) -> BeamSettings | None:
    """The request's beam search, checked against the server's limits (every error names its field); None when it
    asks for none (num_beams 0 or 1: sampling)."""
    if spec.num_beams <= 1:
        return None
    if spec.num_beams > settings.max_beams:
        raise InvalidInputError(f"num_beams: {spec.num_beams} exceeds this server's maximum of {settings.max_beams}")
    n = spec.n or 1
    if n > spec.num_beams:
        raise InvalidInputError(f"n: {n} exceeds num_beams ({spec.num_beams}): a beam search returns at most its beams")
    given = {
        "temperature": spec.temperature is not None,
        "top_k": spec.top_k != 0,
        "top_p": spec.top_p is not None,
        "min_p": spec.min_p is not None,
        "seed": spec.seed is not None,
        "regex": bool(spec.regex),
        "choices": bool(spec.choices),
        "resume": spec.resume is not None,
    }
    for name, why in _REFUSED:
        if given[name]:
            raise InvalidInputError(f"{name}: not with num_beams ({why})")
    penalty = validation.finite("length_penalty", spec.length_penalty, 1.0)
    if not -MAX_LENGTH_PENALTY <= penalty <= MAX_LENGTH_PENALTY:
        raise InvalidInputError(f"length_penalty must be in [-10, 10] (got {penalty})")
    return BeamSettings(spec.num_beams, n, penalty, spec.early_stopping, settings.prefill_chunk_tokens)


class BeamJob(Job):
    """One beam search, run on its model's worker thread."""

    what = "searching beams"
    lane = "beams"  # a search holds its worker for up to max_tokens graph calls: Predict calls do not wait behind it

    def __init__(self, model: ServedModel, text: TokenText, context: Context, feed: np.ndarray, params: BeamParams):
        super().__init__(model)
        self.text, self.context, self.feed, self.params = text, context, feed, params
        self.arrived = time.monotonic()
        self.started = self.searching = 0.0  # when the worker took it; when its context had run

    def run(self) -> list[Beam]:
        self.started = time.monotonic()
        ctx = self.context
        logits, _, state = run_context(self.model, ctx.state, self.feed, self.params.chunk, self.check)
        self.searching = time.monotonic()
        return search_from(self.model, self.text, logits, state, int(self.feed[-1]), ctx.seen, self.params, self.check)


@dataclass
class BeamCall:
    """A checked beam search, ready to run (``outputs``), and the form its beams are reported in."""

    job: BeamJob
    settings: BeamSettings
    snapshots: bool  # each beam's context is wanted (return_snapshot)
    n: int = 0  # beams reported: known once it ran

    async def outputs(self, workers: ModelWorkers) -> AsyncIterator[list[Output]]:
        """The search on the model's worker, then its ``n`` best beams as candidates, best first (one item each)."""
        beams = (await workers.submit(self.job))[: self.settings.n]
        self.n = len(beams)
        yield [Output(rank, _deltas(beam), self._result(beam)) for rank, beam in enumerate(beams)]

    def cancel(self) -> None:
        """Stop the search at its next graph call, if it still runs."""
        if self.job.cancel_reason is None:
            self.job.cancel_reason = CancelledError("the client cancelled or disconnected")

    def _result(self, beam: Beam) -> Result:
        job, ctx = self.job, self.job.context
        now = time.monotonic()
        return Result(
            finish=beam.finish,
            stop=beam.stop,
            stop_token=beam.stop_token,
            cumulative_logprob=beam.cumulative_logprob,
            beam_score=beam.score,
            prompt_tokens=int(job.feed.size),
            generated_tokens=len(beam.token_ids),
            seed=0,  # a beam search samples nothing (Completion.seed)
            context=_after(ctx, job.feed, beam) if self.snapshots else None,
            queue_seconds=job.started - job.arrived,
            prompt_seconds=job.searching - job.started,
            first_token_seconds=now - job.arrived,  # its text comes when the search ends
            total_seconds=now - job.arrived,
        )


def beam_call(
    spec: GenerateSpec,
    beam: BeamSettings,
    context: Context,
    feed: np.ndarray,
    text: TokenText,
    controls: SamplingParams,
    max_tokens: int,
    stops: list[str],
    stop_ids: frozenset[int],
    time_remaining: float | None,
) -> BeamCall:
    """A beam search from ``context`` (not changed) through ``feed`` (its seen tokens marked), as ``spec`` asks,
    within ``time_remaining`` seconds from now."""
    params = BeamParams(
        num_beams=beam.num_beams,
        max_tokens=max_tokens,
        length_penalty=beam.length_penalty,
        early_stopping=beam.early_stopping,
        controls=controls,
        stops=tuple(stops),
        stop_ids=stop_ids,
        top_logprobs=spec.top_logprobs,
        chunk=beam.chunk,
    )
    job = BeamJob(context.model, text, context, feed, params)
    if time_remaining is not None:
        job.deadline = time.monotonic() + time_remaining
    return BeamCall(job, beam, spec.return_snapshot)


def _deltas(beam: Beam) -> list[Delta]:
    """A beam as a stream's deltas: one per token (its id, log-probability and released text)."""
    return [
        Delta(piece, [logprob], 1, token)
        for piece, logprob, token in zip(beam.pieces, beam.logprobs, beam.token_ids, strict=True)
    ]


def _after(ctx: Context, feed: np.ndarray, beam: Beam) -> Context:
    """The context after ``feed`` and the beam's tokens, its last token pending (as Generate leaves one)."""
    after = ctx.copy()
    after.state = beam.state
    after.pending = beam.token_ids[-1]
    after.token_count = ctx.token_count + int(feed.size) + len(beam.token_ids) - 1
    after.seen[beam.token_ids] = True
    return after
