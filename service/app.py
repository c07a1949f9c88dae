"""The service without its transport: validates requests, builds sequences for the engines, keeps sessions and
snapshots, and turns finished sequences into results. The gRPC servicer only converts messages to and from it.
Runs on the server's event loop thread (sessions are not shared with the engine threads)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from collections.abc import Sequence as Ids
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service import beam_generate, generation, resume, validation
from service.admission import Admission
from service.constraints import Compiler, ConstraintSpec, Cursor
from service.context import Context
from service.contexts import Contexts
from service.engine import Engine
from service.generation import Generation, Outcome, Output
from service.metrics import Metrics
from service.models import ModelRegistry, ServedModel
from service.predict import Predictor
from service.sequence import Delta, Result, Sequence
from service.sessions import Session, SessionStore
from service.settings import ServerSettings
from service.snapshots import SnapshotCodec
from textgen.errors import CancelledError, InvalidInputError, TextgenError

log = logging.getLogger("textgen.app")

# A resumed stream's received tokens (their text replayed through the stop matcher) up to this many are replayed on
# the event loop, as a short prompt is encoded there (service.contexts); more on a worker thread.
_INLINE_REPLAY_TOKENS = 256


@dataclass
class GenerateSpec:
    """A generate request's fields, as the transport received them (unset optionals are None)."""

    model: str = ""
    prompt: str = ""
    max_tokens: int = 0
    temperature: float | None = None
    top_k: int = 0
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    session_id: str = ""
    snapshot: bytes = b""
    return_snapshot: bool = False
    return_token_ids: bool = False
    resume: resume.ResumeSpec | None = None  # continue an interrupted stream (service/resume.py)
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logit_bias_text: Mapping[str, float] = field(default_factory=dict)
    allowed_token_ids: Ids[int] = ()
    banned_token_ids: Ids[int] = ()
    stop_token_ids: Ids[int] = ()
    top_logprobs: int = 0
    n: int = 0  # candidates (0: one)
    num_beams: int = 0  # beam search (0 or 1: off)
    length_penalty: float | None = None
    early_stopping: bool = False
    regex: str = ""  # constrained decoding: a pattern, or
    choices: Ids[str] = ()  # a list of texts
    principal: str = ""  # who is calling (service/principals.py): a session is used only by its owner


@dataclass
class ScoreResult:
    model: ServedModel
    token_ids: np.ndarray
    logprobs: np.ndarray

    @property
    def loss(self) -> float:
        return float(-self.logprobs.mean(dtype=np.float64)) if self.logprobs.size else 0.0


class App:
    def __init__(self, settings: ServerSettings, registry: ModelRegistry, metrics: Metrics | None = None):
        self.settings = settings
        self.registry = registry
        self.metrics = metrics if metrics is not None else Metrics()
        self.engines = {m.name: Engine(m, settings, self.metrics.observer(m.name)) for m in registry}
        self.sessions = SessionStore(
            settings.max_sessions,
            settings.session_memory_bytes,
            settings.session_ttl_seconds,
            settings.max_sessions_per_principal,
        )
        self.metrics.bind(self)
        self.snapshots = SnapshotCodec.from_settings(settings)
        if self.snapshots.ephemeral_key:
            log.warning("no snapshot key (TEXTGEN_SNAPSHOT_KEY_FILE): snapshots resume only on this server process")
        self.draining = False
        self.admission = Admission(settings, lambda: self.draining)  # calls in progress, over every transport
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")
        self.contexts = Contexts(registry, self.sessions, self.snapshots, self._encoder, settings.max_prompt_tokens)
        self.constraints = {m.name: Compiler(m.tokenizer) for m in registry}  # GenerateRequest.regex, .choices
        self.predictor = Predictor(self)  # Predict calls (service/predict.py)

    def start(self) -> None:
        for engine in self.engines.values():
            engine.start()

    def drain(self) -> None:
        self.draining = True
        for engine in self.engines.values():
            engine.drain()

    @property
    def busy(self) -> bool:
        return any(not e.idle for e in self.engines.values()) or not self.predictor.idle

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()
        self.predictor.stop()
        self._encoder.shutdown(wait=False, cancel_futures=True)

    def model_label(self, model: str, session_id: str = "") -> str:
        """The metrics label for a call naming ``model`` (or a session): a served model's name, or "unknown",
        never the caller's string (label values must stay a small, fixed set)."""
        if not model and session_id:
            return self.sessions.model_of(session_id) or "unknown"
        try:
            return self.registry.get(model).name
        except TextgenError:
            return "unknown"

    # -- generation -----------------------------------------------------------------------------------------
    async def start_generation(
        self,
        spec: GenerateSpec,
        loop: asyncio.AbstractEventLoop,
        time_remaining: float | None = None,
    ) -> Generation:
        """Validate ``spec`` and queue its sequence (with n > 1, its candidates'); every validation error names its
        field."""
        params = validation.sampling_params(spec, self.settings)
        max_tokens = validation.max_tokens(self.settings, spec.max_tokens)
        stops = validation.stop_strings(self.settings, spec.stop)
        limits = self.settings.max_constraint_chars, self.settings.max_choices
        constraint = ConstraintSpec.of(spec.regex, spec.choices, *limits)  # None: unconstrained
        beam = beam_generate.beam_settings(spec, self.settings)  # None: sampling (num_beams 0 or 1)
        if constraint is not None and beam is not None:
            raise InvalidInputError(f"{constraint.field}: constrained decoding is not available with num_beams")
        n = generation.candidates(self.settings, spec.n) if beam is None else beam.n
        if spec.resume is not None and n > 1:
            raise InvalidInputError("resume: not with n > 1 (resume each candidate as an n = 1 request with its seed)")
        if spec.resume is not None and spec.session_id:
            raise InvalidInputError(
                "resume: a session's stream cannot be resumed (the session lives on the replica that holds it); "
                "carry the conversation as a snapshot to resume on any replica"
            )
        opened = await self.contexts.open(spec.model, spec.session_id, spec.snapshot, spec.principal, spec.seed)
        engine, ctx, session = self.engines[opened.model.name], opened.context, opened.session
        try:
            params = validation.token_controls(params, spec, engine.model)  # the checks that need the model
            stop_ids = validation.token_ids("stop_token_ids", spec.stop_token_ids, engine.model)
            if spec.seed is not None and (session is not None or spec.snapshot):
                ctx.reseed(spec.seed)
            feed = Contexts.feed(engine.model, ctx, await self.contexts.encode(engine.model, spec.prompt, "prompt"))
            cursor = None
            if constraint is not None:  # compiled (or found compiled) and checked on a worker thread
                start = self.constraints[engine.model.name].start
                cursor = await loop.run_in_executor(self._encoder, start, constraint, int(feed[-1]))
            replay = None
            if spec.resume is not None:
                replay = await self._replay(spec.resume, engine, feed, stops, max_tokens, stop_ids, cursor)
                feed = resume.feed(feed, replay)
            ctx.seen[feed] = True  # the repetition penalty covers the prompt too, as in the torch reference
            if beam is not None:  # on the model's worker, not the engine (service/beam_generate.py)
                args = (ctx, feed, engine.output.text, params, max_tokens, stops, stop_ids, time_remaining)
                return Generation([], engine, spec, session, beams=beam_generate.beam_call(spec, beam, *args))
            seq = Sequence(
                context=ctx,
                feed=feed,
                params=params,
                max_tokens=max_tokens,
                stops=stops,
                logprobs=spec.logprobs or spec.top_logprobs > 0,
                top_logprobs=spec.top_logprobs,
                stop_ids=stop_ids,
                deadline=None if time_remaining is None else time.monotonic() + time_remaining,
                loop=loop,
                # else its state row stays on the device (n > 1 never changes a session)
                keep_context=(session is not None and n == 1) or spec.return_snapshot,
                token_ids=spec.return_token_ids,
                sum_logprobs=n > 1,
                constraint=cursor,
            )
            if replay is not None:
                resume.apply(seq, replay)
            seq.followers = generation.followers(seq, n)
            engine.submit(seq)
        except BaseException:
            if session is not None:
                self.sessions.release(session)
            raise
        return Generation([seq, *seq.followers], engine, spec, session)

    async def _replay(
        self,
        spec: resume.ResumeSpec,
        engine: Engine,
        prompt_feed: np.ndarray,
        stops: list[str],
        max_tokens: int,
        stop_ids: frozenset[int],
        cursor: Cursor | None,
    ) -> resume.Replay:
        tokens = resume.check(spec, engine.model, max_tokens, engine.resume_refusal)
        args = (spec, tokens, engine.output.text, stops, max_tokens, int(prompt_feed[-1]), stop_ids, cursor)
        if tokens.size <= _INLINE_REPLAY_TOKENS and cursor is None:  # (a pattern's token may cost a mask: ms)
            return resume.replay(*args)
        return await asyncio.get_running_loop().run_in_executor(self._encoder, resume.replay, *args)

    async def follow(self, gen: Generation) -> AsyncIterator[tuple[list[Delta], Result | None]]:
        """The sequence's output as it comes: every delta produced since the last yield (so a reader that falls
        behind gets them coalesced), and the result with the last batch."""
        seq = gen.seq
        assert seq.event is not None
        while True:
            await seq.event.wait()
            seq.event.clear()
            deltas, result = seq.take()
            if seq.paused:
                gen.engine.wake()  # its buffer has room again
            if deltas or result is not None:
                yield deltas, result
            if result is not None:
                return

    async def run(
        self, spec: GenerateSpec, loop: asyncio.AbstractEventLoop, time_remaining: float | None = None
    ) -> AsyncIterator[tuple[Generation, list[tuple[Output, Outcome | None]]]]:
        """A generate call as a transport drives it (gRPC and HTTP alike): at each wake-up, each candidate's new
        output with its outcome when it ended. The caller commits once every final message is delivered; however
        the call ends, the generation is settled here. A candidate that failed fails the call."""
        gen = await self.start_generation(spec, loop, time_remaining)
        try:
            async for outs in self.outputs(gen):
                items = []
                for out in outs:
                    if out.result is not None and out.result.error is not None:
                        raise out.result.error
                    items.append((out, self.outcome(gen, out) if out.result is not None else None))
                yield gen, items
        finally:
            self.end_generation(gen)

    def outputs(self, gen: Generation) -> AsyncIterator[list[Output]]:
        """The generation's output as it comes, as per-candidate items (``service.generation.follow``; a beam
        search's beams when it ends)."""
        if gen.beams is not None:
            return gen.beams.outputs(self.predictor.workers)
        return generation.follow(gen.seqs, gen.engine.wake)

    def outcome(self, gen: Generation, out: Output | None = None) -> Outcome:
        """A finished candidate (``out``; None: candidate 0) as its final message reports it (a snapshot when
        asked). Nothing changes on the server until ``commit``, after the last final message is delivered."""
        index, result = (0, gen.seq.result) if out is None else (out.index, out.result)
        assert result is not None
        gen.reported += 1
        if gen.session is not None and gen.reported == gen.n and (result.context is not None or gen.reads_session):
            gen.settled = self.contexts.settling(gen.session.id)
        snapshot = self.snapshots.dump(result.context) if gen.spec.return_snapshot and result.context else b""
        return Outcome(result, snapshot, gen.session.id if gen.session else "", index)

    def commit(self, gen: Generation) -> None:
        """The final messages were delivered: the session takes the generation's context (n = 1 only). Only then,
        so a call that is cancelled or times out, however late, never changes its session."""
        if gen.ended or any(s.result is None or s.result.error is not None for s in gen.seqs):
            return
        gen.committed = not gen.reads_session
        self.end_generation(gen)

    def end_generation(self, gen: Generation) -> None:
        """Settle a generation, however it ended: cancel the sequence if it is still running (the client went
        away), release the session, taking the new context only if ``commit`` said so. Idempotent."""
        if gen.ended:
            return
        gen.ended = True
        result = gen.seq.result if gen.seqs else None
        if gen.beams is not None:
            gen.beams.cancel()  # (if still running: the client went away)
        running = [s for s in gen.seqs if s.result is None]
        for seq in running:
            seq.cancel(CancelledError("the client cancelled or disconnected"))
        if running:
            gen.engine.wake()
        if gen.session is not None:
            self.sessions.release(gen.session, result.context if gen.committed and result is not None else None)
            if gen.settled is not None:
                self.contexts.settled(gen.session.id, gen.settled)

    # -- scoring ----------------------------------------------------------------------------------------------
    async def score(
        self, model_name: str, text: str, loop: asyncio.AbstractEventLoop, time_remaining: float | None = None
    ) -> ScoreResult:
        model = self.registry.get(model_name)
        if not text:
            raise InvalidInputError("text: empty; nothing to score")
        ids = await self.contexts.encode(model, text, "text")
        if ids.size == 0:
            raise InvalidInputError("text: holds no tokens (only whitespace?)")
        feed = np.concatenate([[model.tokenizer.start_id], ids[:-1]]).astype(np.int64)
        seq = Sequence(
            context=Context.fresh(model, 0),
            feed=feed,
            score_targets=ids,
            deadline=None if time_remaining is None else time.monotonic() + time_remaining,
            loop=loop,
        )
        engine = self.engines[model.name]
        engine.submit(seq)
        gen = Generation([seq], engine, GenerateSpec())
        try:
            async for _, result in self.follow(gen):
                if result is not None:
                    if result.error is not None:
                        raise result.error
                    assert result.score_logprobs is not None
                    return ScoreResult(model, ids, result.score_logprobs)
        finally:
            self.end_generation(gen)
        raise AssertionError("scoring ended without a result")

    # -- sessions ---------------------------------------------------------------------------------------------
    def create_session(
        self, model_name: str, snapshot: bytes = b"", seed: int | None = None, principal: str = ""
    ) -> Session:
        model = self.registry.get(model_name)
        if snapshot:
            ctx = self.snapshots.load(snapshot, model)
            if seed is not None:
                ctx.reseed(seed)
        else:
            ctx = Context.fresh(model, seed)
        return self.sessions.create(ctx, principal)

    def fork_session(self, session_id: str, seed: int | None = None, principal: str = "") -> Session:
        source = self.sessions.get(session_id, principal)  # only the owner may fork; the copy is theirs too
        ctx = source.context.copy()
        if seed is not None:
            ctx.reseed(seed)
        return self.sessions.create(ctx, principal)

    def close_session(self, session_id: str, principal: str = "") -> None:
        self.sessions.close(session_id, principal)
