"""Predict: the most likely next tokens or words after a context (a keyboard's suggestions), with the state after
the context for the next keystrokes. The search itself is ``service.word_search``.

Why not through the engine: a keyboard needs its answer within about 20 ms of a key press, and a word search is a
chain of up to ``max_word_chars`` dependent graph calls. Interleaved with the engine's steps, each of them would
wait for a whole step of everyone else's work (a 512-token prompt chunk, a decode batch of 64), so the search would
take its length times the step time under load. Here each model has one worker thread (``service.workers``,
shared with beam search) that runs a call's context and search back to back on host states (a few KB per beam,
``ServedModel.run``): a call holds no batch slot and no device-resident state, so it never takes a slot a stream
needs, and at most one call per model runs at a time (it
competes with the engine for the cores like one more stream does; ONNX Runtime serialises runs itself where a
provider cannot run them concurrently, as under CUDA graphs). Calls wait in a queue of at most ``max_queue``
(beyond: RESOURCE_EXHAUSTED); the prompt limit, deadlines (checked before every graph call) and cancellation hold
as for Generate, and the model work never runs on the event loop.

Sessions and snapshots: the context advances by exactly the tokens of ``text``. Its state is kept as Generate keeps
one, with the last token pending (not yet fed), so the next call (more keystrokes, or a Generate) feeds it first:
predicting after "th" and then after "e" with the returned snapshot is predicting after "the". A session takes the
new context only when the call succeeds (``commit``); a cancelled or expired call leaves it unchanged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.context import Context
from service.contexts import Contexts
from service.models import ServedModel, State
from service.sessions import Session
from service.word_search import Found, Vocabulary, log_softmax, search_words, top_tokens
from service.workers import Job, ModelWorkers, run_context
from textgen.errors import InvalidInputError

if TYPE_CHECKING:
    from service.app import App

DEFAULT_PREDICTIONS = 3  # a keyboard's suggestion strip (Hard et al. 2018)
DEFAULT_WORD_CHARS = 24
UNITS = ("", "token", "word")  # "": words for a character model, tokens for a word model


@dataclass
class PredictSpec:
    """A Predict request's fields, as the transport received them."""

    model: str = ""
    text: str = ""
    session_id: str = ""
    snapshot: bytes = b""
    num_predictions: int = 0
    unit: str = ""
    return_snapshot: bool = False
    max_word_chars: int = 0
    principal: str = ""


@dataclass(frozen=True)
class Prediction:
    text: str
    token_ids: list[int]
    logprob: float


@dataclass
class Predicted:
    """A finished Predict call, before its session (if any) takes the new context (``Predictor.commit``)."""

    model: ServedModel
    predictions: list[Prediction]
    context: Context  # after ``text``
    context_tokens: int
    snapshot: bytes = b""
    session: Session | None = None
    ended: bool = False


class _Job(Job):
    """One call's model work, run on its model's worker thread."""

    what = "predicting"

    def __init__(
        self,
        model: ServedModel,
        vocab: Vocabulary,
        state: State,
        feed: np.ndarray,
        words: bool,
        n: int,
        max_chars: int,
        chunk: int,
    ) -> None:
        super().__init__(model)
        self.vocab, self.state, self.feed = vocab, state, feed
        self.words, self.n, self.max_chars, self.chunk = words, n, max_chars, chunk

    def run(self) -> tuple[list[Found], State]:
        """The predictions, and the state after all of ``feed`` but its last token."""
        vocab = self.vocab
        logits, state, after_last = run_context(self.model, self.state, self.feed, self.chunk, self.check)
        row = log_softmax(logits)[0]
        if self.words and vocab.char:
            allow_empty = not vocab.ends_word(int(self.feed[-1]))
            found = search_words(self.model, vocab, row, after_last, self.n, self.max_chars, allow_empty, self.check)
        else:
            found = top_tokens(row, self.n, vocab.not_words if self.words else vocab.banned)
        return found, state


class Predictor:
    """The app's Predict calls: one worker thread and one bounded queue per model."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._vocab = {m.name: Vocabulary(m) for m in app.registry}
        self.workers = ModelWorkers(app)  # shared with beam search (service/beam_generate.py)

    @property
    def idle(self) -> bool:
        return self.workers.idle

    def stop(self) -> None:
        self.workers.stop()

    def _limits(self, spec: PredictSpec) -> tuple[int, int, bool | None]:
        """num_predictions, max_word_chars and whether words were asked for (None: the model's default)."""
        settings = self.app.settings
        n = spec.num_predictions or min(DEFAULT_PREDICTIONS, settings.max_predictions)
        if n > settings.max_predictions:
            raise InvalidInputError(f"num_predictions: {n} exceeds this server's maximum of {settings.max_predictions}")
        chars = spec.max_word_chars or min(DEFAULT_WORD_CHARS, settings.max_predict_word_chars)
        if chars > settings.max_predict_word_chars:
            raise InvalidInputError(
                f"max_word_chars: {chars} exceeds this server's maximum of {settings.max_predict_word_chars}"
            )
        if spec.unit not in UNITS:
            raise InvalidInputError(f"unit: unknown value {spec.unit!r} (token or word)")
        return n, chars, {"": None, "token": False, "word": True}[spec.unit]

    async def predict(self, spec: PredictSpec, time_remaining: float | None = None) -> Predicted:
        """Validate ``spec``, run its context and search on the model's worker; every validation error names its
        field. With a session, the session is held (busy) until ``commit`` or ``end``."""
        n, max_chars, words = self._limits(spec)
        app = self.app
        opened = await app.contexts.open(spec.model, spec.session_id, spec.snapshot, spec.principal)
        model, ctx, session = opened.model, opened.context, opened.session
        try:
            ids = await app.contexts.encode(model, spec.text, "text")
            feed = Contexts.feed(model, ctx, ids)
            job = _Job(
                model,
                self._vocab[model.name],
                ctx.state,
                feed,
                vocab_words(self._vocab[model.name], words),
                n,
                max_chars,
                app.settings.prefill_chunk_tokens,
            )
            found, state = await self.workers.submit(job, time_remaining)
            if ids.size or ctx.pending >= 0:  # else nothing was fed but a text's start: the context stays fresh
                ctx.state, ctx.pending = state, int(feed[-1])
                ctx.token_count += feed.size - 1
                ctx.seen[feed] = True  # as Generate marks its prompt (the repetition penalty)
            vocab = self._vocab[model.name]
            predictions = [
                Prediction("".join(vocab.text[t] for t in f.token_ids), f.token_ids, f.logprob) for f in found
            ]
            snapshot = app.snapshots.dump(ctx) if spec.return_snapshot else b""
        except BaseException:
            if session is not None:
                app.sessions.release(session)
            raise
        return Predicted(model, predictions, ctx, int(ids.size), snapshot, session)

    def commit(self, done: Predicted) -> None:
        """The reply is about to go out: the session takes the new context."""
        if done.session is not None and not done.ended:
            done.ended = True
            self.app.sessions.release(done.session, done.context)

    def end(self, done: Predicted) -> None:
        """However the call ended: release the session, unchanged unless ``commit`` came first. Idempotent."""
        if done.session is not None and not done.ended:
            done.ended = True
            self.app.sessions.release(done.session)


def vocab_words(vocab: Vocabulary, words: bool | None) -> bool:
    """Whether the call predicts words: asked for, or by default for a character model."""
    return vocab.char if words is None else words
