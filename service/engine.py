"""Continuous (step-level) batching for one model, on its own thread, split by job the way vLLM splits its
engine: the scheduler (``service.scheduler``) decides who runs, the batch state (``service.batch_state``) holds
every admitted sequence's recurrent state on the session's device and runs the graph, the sampler
(``textgen.sampling``) picks the tokens, and the output processor (``service.output``) turns them into text for
the clients. This module is the loop that drives them.

Each step: retire cancelled, expired and slow-reader sequences; admit waiting ones into free slots; run prompts
(in chunks of at most ``prefill_chunk_tokens`` per step, equal-length chunks batched together) so a long prompt
never stalls running streams for long; advance every decoding sequence by one token in a single ``[batch, 1]``
graph call that names their state slots; sample all rows in one vectorised pass with each request's own
generator; hand the tokens to the output processor and wake the transport once.

A request with n candidates runs its prompt once, as its first candidate (the leader); when the prompt is done each
other candidate gets a host copy of the leader's state row and its last logits row, queues for a slot of its own at
the front of the queue and samples its first token from that row, then runs like any other sequence. A leader that
ends before that (cancelled, expired, failed, shut down) ends its candidates the same way.

A constrained row (GenerateRequest.regex, .choices; service/constraints.py) gets its mask before the sampler runs
and takes its token after: a token that would leave its matched text ends it before that token (the state it then
keeps is the one from before its last emitted token, copied after each step where the row needs a context), and a
row no token can continue fails. Steps without a constrained row do none of this.

The engine thread is the only writer of a running sequence; the transport (the asyncio thread) only drains its
outbox and may set its cancel flag, both safe without a lock."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from service import resume
from service.constraints import Advance
from service.logprobs import token_logprobs
from service.models import ServedModel
from service.observer import EngineObserver
from service.output import OutputProcessor
from service.scheduler import Scheduler
from service.sequence import Finish, Phase, Sequence
from service.settings import ServerSettings
from service.wakes import Wakes
from textgen.errors import FailedPreconditionError, TextgenError
from textgen.sampling import sample_batch

log = logging.getLogger("textgen.engine")

_IDLE_WAIT = 0.05  # seconds an idle engine sleeps before re-checking deadlines of waiting/paused sequences


class Engine:
    def __init__(self, model: ServedModel, settings: ServerSettings, observer: EngineObserver | None = None) -> None:
        self.model = model
        self.state = model.batch_state(settings.max_batch_size)
        self._wakes = Wakes()
        observer = observer or EngineObserver()
        self.scheduler = Scheduler(model.name, settings, self.state, observer, model.vocab_size)
        self.output = OutputProcessor(
            model.tokenizer,
            observer,
            self._wakes,
            min(settings.max_stream_interval, settings.stream_buffer_tokens),
        )
        self._thread = threading.Thread(target=self._run, name=f"engine-{model.name}", daemon=True)
        self.resume_refusal = resume.replay_refusal(model)  # why resumed streams would not be exact here, if so
        if self.resume_refusal:
            log.warning("model %s: resumes are refused (not exact here: %s)", model.name, self.resume_refusal)

    # -- called from the transport --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        self.scheduler.submit(seq)

    def wake(self) -> None:
        with self.scheduler.cond:
            self.scheduler.cond.notify()

    @property
    def observer(self) -> EngineObserver:
        return self.scheduler.observer

    @observer.setter
    def observer(self, observer: EngineObserver) -> None:
        self.scheduler.observer = self.output.observer = observer

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @property
    def max_pause(self) -> float:
        return self.scheduler.max_pause

    @max_pause.setter
    def max_pause(self, seconds: float) -> None:
        self.scheduler.max_pause = seconds

    @property
    def running(self) -> int:
        """Sequences holding a batch slot (prompt or decode, not paused). A counter, not the lists' lengths: a
        sequence moves from one list to the other mid-step, and ``submit`` reads this from another thread."""
        return self.scheduler.admitted

    @property
    def paused(self) -> int:
        """Admitted sequences out of the batch, waiting for their reader (or for a slot again)."""
        return len(self.scheduler.live) - self.scheduler.admitted

    @property
    def queued(self) -> int:
        """Sequences waiting for a slot: queued requests, and the candidates waiting for their leader's prompt."""
        return len(self.scheduler.waiting) + self.scheduler.unforked

    @property
    def idle(self) -> bool:
        return not self.scheduler.waiting and not self.scheduler.live

    def stream_interval(self, running: int) -> int:
        return self.output.stream_interval(running)

    def drain(self) -> None:
        """Take no new work; what is queued or running goes on."""
        with self.scheduler.cond:
            self.scheduler.draining = True

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel whatever is left (finish reason CANCELLED) and end the thread."""
        with self.scheduler.cond:
            self.scheduler.draining = self.scheduler.stopping = True
            self.scheduler.cond.notify()
        self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        sched = self.scheduler
        while True:
            with sched.cond:
                if sched.stopping:
                    break
                if not sched.runnable():
                    sched.cond.wait(_IDLE_WAIT)
            try:
                for seq, finish, error in sched.retire(time.monotonic()):
                    self._finish(seq, finish=finish, error=error)
                with sched.cond:
                    admitted = sched.admit()
                for seq in admitted:
                    self._place(seq)
                self._step()
            except Exception:  # a bug: fail every admitted sequence (wherever the step stopped), keep serving
                log.exception("engine step failed for model %s", self.model.name)
                for seq in list(sched.live.values()):
                    self._finish(seq, error=TextgenError("internal error while generating (logged on the server)"))
                self._wakes.flush()
        for seq in sched.leftovers():
            self._finish(seq, finish=Finish.CANCELLED)
        self._wakes.flush()

    def _place(self, seq: Sequence) -> None:
        try:
            self.scheduler.place(seq)
        except Exception:  # the device copy failed: this request fails alone, and its slot is free again
            log.exception("copying a state row in failed for model %s", self.model.name)
            self._finish(seq, error=TextgenError("internal error while generating (logged on the server)"))

    def _step(self) -> None:
        ready = self._run_prefill()
        rows, logits = self._run_decode()
        if ready:
            rows = rows + [seq for seq, _ in ready]
            new = np.stack([row for _, row in ready])
            logits = new if logits is None else np.concatenate([logits, new])
        if rows:
            assert logits is not None
            self._sample(rows, logits)
        self._wakes.flush()

    # -- prompt ----------------------------------------------------------------------------------------------
    def _run_prefill(self) -> list[tuple[Sequence, np.ndarray]]:
        """Run this step's prompt chunks; return the sequences whose prompt is done, with their last logits row."""
        ready = []
        forked = self.scheduler.forked
        if forked:  # candidates placed this step: their first token comes from their leader's last logits row
            ready = [(s, s.first_logits) for s in forked]
            for s in forked:
                s.first_logits = None
            forked.clear()
        for (n, score), seqs in self.scheduler.plan_prefill().items():
            for batch in ([s] for s in seqs) if score else [seqs]:
                ready.extend(self._prefill_chunk(batch, n))
        return ready

    def _prefill_chunk(self, seqs: list[Sequence], n: int) -> list[tuple[Sequence, np.ndarray]]:
        t0 = time.perf_counter()
        tokens = np.stack([s.feed[s.fed : s.fed + n] for s in seqs])
        score = seqs[0].score
        positions = np.arange(n) if score else np.array([n - 1])
        slots = np.fromiter((s.slot for s in seqs), np.int64, len(seqs))
        logits = self.state.run(tokens, positions, slots)
        seconds = time.perf_counter() - t0
        self.observer.step("prompt", len(seqs), len(seqs) * n, seconds)
        ready = []
        for i, seq in enumerate(seqs):
            seq.prompt_seconds += seconds
            if score:
                assert seq.score_targets is not None
                targets = seq.score_targets[seq.fed : seq.fed + n]
                seq.score_parts.append(token_logprobs(logits[0], targets))
            seq.fed += n
            if seq.fed == seq.feed.size:
                self.scheduler.prefill.remove(seq)
                if score:
                    self._finish(seq, finish=Finish.LENGTH)
                else:
                    seq.context.token_count += seq.feed.size
                    if seq.followers:
                        self._fork(seq, logits[i, -1])
                    if seq.resume_token >= 0:
                        self._rejoin(seq)
                    else:
                        ready.append((seq, logits[i, -1]))
        return ready

    def _fork(self, leader: Sequence, row: np.ndarray) -> None:
        """The leader's prompt has run: its candidates take its state (one host copy, shared: a slot's state is
        copied in when it is placed) and its last logits row, and queue for slots at the front of the queue."""
        state = self.state.take([leader.slot])
        row = row.copy()  # only this row of the chunk's logits is kept
        followers, leader.followers = leader.followers, []
        for f in followers:
            f.own_state, f.first_logits, f.fed = state, row, f.feed.size
            f.context.token_count = leader.context.token_count
            f.prompt_seconds = leader.prompt_seconds
        self.scheduler.fork(followers)

    def _rejoin(self, seq: Sequence) -> None:
        """A resumed stream's context has run: it stands where its interrupted stream stood, with the last token
        it received to feed next (service/resume.py), so it joins the decode batch without sampling."""
        seq.next_token = seq.resume_token
        if seq.constraint is not None and seq.keep_context:
            self._keep_state_before(seq)
        seq.phase = Phase.DECODE
        seq.last_token = time.monotonic()
        self.scheduler.decode.append(seq)
        if seq.resume_ending is not None:  # it had ended there: only its final message was lost
            finish, stop = seq.resume_ending
            self._finish(seq, finish=finish, stop=stop)

    # -- one decode step ------------------------------------------------------------------------------------
    def _run_decode(self) -> tuple[list[Sequence], np.ndarray | None]:
        rows = [s for s in self.scheduler.decode if not s.paused]
        if not rows:
            return [], None
        tokens = np.fromiter((s.next_token for s in rows), np.int64, len(rows))
        slots = np.fromiter((s.slot for s in rows), np.int64, len(rows))
        t0 = time.perf_counter()
        logits = self.state.decode(tokens, slots)
        self.observer.step("decode", len(rows), len(rows), time.perf_counter() - t0)
        for s in rows:
            s.context.token_count += 1
        return rows, logits

    # -- sampling and output ----------------------------------------------------------------------------------
    def _sample(self, rows: list[Sequence], logits: np.ndarray) -> None:
        masks = steps = None
        if any(s.constraint is not None for s in rows):  # constrained decoding: only then does a step pay for it
            rows, logits, masks = self._constrain(rows, logits)
            if not rows:
                return
        params = [s.params for s in rows]
        seen = None
        if any(p.repetition_penalty != 1.0 for p in params):  # only the penalty reads the seen-token masks
            seen = [s.context.seen for s in rows]
        counts = None
        if any(s.counts is not None for s in rows):  # only the presence and frequency penalties read the counts
            counts = [s.counts for s in rows]
        tokens = sample_batch(logits, params, [s.context.rng for s in rows], seen, counts, masks)
        if masks is not None:
            rows, tokens, logits, steps = self._advance(rows, tokens, logits)
        for seq in rows:
            if seq.phase is Phase.PREFILL:  # its first token: it joins the decode batch
                seq.phase = Phase.DECODE
                self.scheduler.decode.append(seq)
        for seq, finish, stop in self.output.emit(rows, tokens, logits, steps):
            self._finish(seq, finish=finish, stop=stop)
        if steps is not None:
            for seq, step in zip(rows, steps, strict=True):
                if step is Advance.REJECT:  # its token would leave its matched pattern: it ends before it
                    self._finish(seq, finish=Finish.STOP, rejected=True)
                elif seq.constraint is not None and seq.keep_context and not seq.done:
                    self._keep_state_before(seq)

    def _keep_state_before(self, seq: Sequence) -> None:
        """A matched text may end before the next token (``_finish``'s ``rejected``): the state that ending keeps,
        the state before the token the next step feeds, is the one in its slot now."""
        seq.state_before = (
            self.state.take([seq.slot]) if seq.constraint is not None and seq.constraint.matched else None
        )

    def _constrain(
        self, rows: list[Sequence], logits: np.ndarray
    ) -> tuple[list[Sequence], np.ndarray, list[np.ndarray | None]]:
        """The masks of the constrained rows (service/constraints.py; with the request's own exclusions). A row
        whose text no token can continue fails (FAILED_PRECONDITION, naming its field) and leaves the step."""
        vocab = logits.shape[1]
        masks: list[np.ndarray | None] = []
        failed = []
        for i, seq in enumerate(rows):
            cursor, sp = seq.constraint, seq.params
            mask = None
            if cursor is not None:
                try:
                    mask = cursor.mask(
                        sp.controls(vocab).ceiling if sp.allowed_token_ids or sp.banned_token_ids else None
                    )
                except FailedPreconditionError as exc:
                    failed.append(i)
                    self._finish(seq, error=exc)
            masks.append(mask)
        if not failed:
            return rows, logits, masks
        keep = [i for i in range(len(rows)) if i not in failed]
        return [rows[i] for i in keep], logits[keep], [masks[i] for i in keep]

    def _advance(
        self, rows: list[Sequence], tokens: np.ndarray, logits: np.ndarray
    ) -> tuple[list[Sequence], np.ndarray, np.ndarray, list[Advance | None]]:
        """Each constrained row takes its token: on, ended after it, or ended before it (``Advance``). A row whose
        pattern runs into the server's limits fails and leaves the step."""
        steps: list[Advance | None] = []
        failed = []
        for i, (seq, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            step = None
            if seq.constraint is not None:
                try:
                    step = seq.constraint.advance(token)
                except FailedPreconditionError as exc:
                    failed.append(i)
                    self._finish(seq, error=exc)
            steps.append(step)
        if not failed:
            return rows, tokens, logits, steps
        keep = [i for i in range(len(rows)) if i not in failed]
        return [rows[i] for i in keep], tokens[keep], logits[keep], [steps[i] for i in keep]

    def _finish(
        self,
        seq: Sequence,
        finish: Finish | None = None,
        stop: str = "",
        error: TextgenError | None = None,
        rejected: bool = False,
    ) -> None:
        """End ``seq``. ``rejected``: before its sampled token, which would have left its matched pattern (its state
        is then the one before its last emitted token, which stays pending, as at any other ending)."""
        if seq.phase is Phase.DONE:
            return
        ctx = None
        if error is None and not seq.score and seq.keep_context and finish in (Finish.LENGTH, Finish.STOP):
            ctx = seq.context
            if rejected:
                assert seq.state_before is not None
                ctx.state, ctx.token_count = seq.state_before, ctx.token_count - 1
            else:
                ctx.state = self.state.take([seq.slot]) if seq.holds_slot else seq.own_state
            if seq.phase is Phase.DECODE:
                ctx.pending = seq.next_token
        self.scheduler.remove(seq)
        seq.phase = Phase.DONE
        seq.result = seq.ending(finish, stop, error, ctx)
        self.observer.finished(seq)
        self._wakes.add(seq)
        if seq.followers:  # it ended before its prompt had run: so do the candidates that were to share it
            followers, seq.followers = seq.followers, []
            self.scheduler.drop_followers(len(followers))
            for f in followers:
                self._finish(f, finish=finish, stop=stop, error=error)
