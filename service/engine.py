"""Continuous (step-level) batching for one model, on its own thread.

Each step: retire cancelled and expired sequences; admit waiting ones into free slots; run prompts (in chunks of
at most ``prefill_chunk_tokens`` per step, equal-length chunks batched together) so a long prompt never stalls
running streams for long; advance every decoding sequence by one token in a single ``[batch, 1]`` graph call;
sample all rows in one vectorised pass with each request's own generator; queue the text deltas and wake the
transport once. The batch's recurrent state is the graph's own output, reused as the next step's input: rows are
gathered again only when the set of decoding sequences changes.

A stream whose client stops reading fills its bounded buffer and is paused: it leaves the decode batch and gives
up its slot (``max_batch_size`` counts only sequences that can run), keeping its state; when its reader makes room
it queues for a slot again, in order with waiting requests. A pause longer than ``max_pause_seconds`` ends it
(SLOW_READER).
A Score pass computes at most ``score_step_logits`` logits per step, so scoring never stalls running streams.

The engine thread is the only writer of a running sequence; the transport (the asyncio thread) only drains its
outbox and may set its cancel flag, both safe without a lock."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from service.logprobs import token_logprobs
from service.models import ServedModel, State
from service.observer import EngineObserver
from service.sequence import Delta, Finish, Phase, Sequence, TokenLogprob
from service.settings import ServerSettings
from service.wakes import Wakes
from textgen.errors import DeadlineExceededError, OverloadedError, TextgenError, UnavailableError
from textgen.sampling import sample_batch

log = logging.getLogger("textgen.engine")

_IDLE_WAIT = 0.05  # seconds an idle engine sleeps before re-checking deadlines of waiting/paused sequences


class Engine:
    def __init__(self, model: ServedModel, settings: ServerSettings, observer: EngineObserver | None = None) -> None:
        self.model = model
        self.max_batch = settings.max_batch_size
        self.max_queue = settings.max_queue
        self.chunk_tokens = settings.prefill_chunk_tokens
        self.buffer_limit = settings.stream_buffer_tokens
        self.cancel_slow_readers = settings.slow_reader_policy == "cancel"
        self.max_pause = settings.max_pause_seconds
        # Positions a score pass runs per step: its graph call and log-probabilities cost about positions x vocab.
        self.score_step_tokens = max(1, settings.score_step_logits // model.vocab_size)
        self.max_stream_interval = min(settings.max_stream_interval, settings.stream_buffer_tokens)
        self.observer = observer or EngineObserver()
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()  # guarded by _cond
        self._prefill: list[Sequence] = []
        self._decode: list[Sequence] = []  # includes paused sequences
        self._rows: list[Sequence] = []  # sequences whose state is in _batch_state, in row order
        self._batch_state: State = ()
        self._admitted = 0  # sequences holding a batch slot
        # Sequences admitted and not finished (paused ones included), by id: a failed step ends each, wherever it was.
        self._live: dict[int, Sequence] = {}
        self._ready = 0  # paused sequences whose reader made room: they queue for a slot like waiting requests
        self._draining = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{model.name}", daemon=True)
        self._wakes = Wakes()

    # -- called from the transport --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if self._draining:
                raise UnavailableError("server is shutting down; retry on another replica")
            free = max(0, self.max_batch - self.running)
            if len(self._waiting) + self._ready >= self.max_queue + free:  # paused streams queue for slots too
                raise OverloadedError(
                    f"model {self.model.name}: request queue full ({len(self._waiting)} waiting, "
                    f"{self.running} running); retry later"
                )
            self._waiting.append(seq)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def running(self) -> int:
        """Sequences holding a batch slot (prompt or decode, not paused). A counter, not the lists' lengths: a
        sequence moves from one list to the other mid-step, and ``submit`` reads this from another thread."""
        return self._admitted

    @property
    def paused(self) -> int:
        """Admitted sequences out of the batch, waiting for their reader (or for a slot again)."""
        return len(self._live) - self._admitted

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._live

    def drain(self) -> None:
        """Take no new work; what is queued or running goes on."""
        with self._cond:
            self._draining = True

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel whatever is left (finish reason CANCELLED) and end the thread."""
        with self._cond:
            self._draining = self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    break
                if not self._runnable():
                    self._cond.wait(_IDLE_WAIT)
            try:
                self._retire(time.monotonic())
                with self._cond:
                    self._admit()
                self._step()
            except Exception:  # a bug: fail every admitted sequence (wherever the step stopped), keep serving
                log.exception("engine step failed for model %s", self.model.name)
                for seq in list(self._live.values()):
                    self._finish(seq, error=TextgenError("internal error while generating (logged on the server)"))
                self._rows, self._batch_state = [], ()
                self._wakes.flush()
        with self._cond:
            leftovers = [*self._waiting, *self._prefill, *self._decode]
            self._waiting.clear()
        for seq in leftovers:
            self._finish(seq, finish=Finish.CANCELLED)
        self._wakes.flush()

    def _runnable(self) -> bool:
        return bool(self._waiting) or bool(self._prefill) or any(not s.paused for s in self._decode)

    def _take_slot(self, seq: Sequence) -> None:
        seq.holds_slot = True
        self._admitted += 1

    def _release_slot(self, seq: Sequence) -> None:
        if seq.holds_slot:
            seq.holds_slot = False
            self._admitted -= 1

    def _admit(self) -> None:
        """Fill free slots in order of readiness: waiting requests by arrival, paused sequences by when their
        reader made room again, so streams that keep pausing cannot jump the queue."""
        now = time.monotonic()
        ready = sorted((s for s in self._decode if s.paused and s.ready_since), key=lambda s: s.ready_since)
        while (ready or self._waiting) and self._admitted < self.max_batch:
            if ready and (not self._waiting or ready[0].ready_since <= self._waiting[0].arrived):
                seq = ready.pop(0)
                seq.paused, seq.ready_since = False, 0.0
                self._take_slot(seq)
                continue
            seq = self._waiting.popleft()
            if self._reap_reason(seq, now) is not None:
                self._waiting.appendleft(seq)  # reaped at the next step, with the others
                break
            seq.phase = Phase.PREFILL
            seq.admitted = now
            self._prefill.append(seq)
            self._take_slot(seq)
            self._live[seq.id] = seq
            self.observer.admitted(seq)

    def _reap_reason(self, seq: Sequence, now: float) -> TextgenError | None:
        if seq.cancel_reason is not None:
            return seq.cancel_reason
        if seq.deadline is not None and now >= seq.deadline:
            return DeadlineExceededError("deadline exceeded while generating")
        return None

    def _retire(self, now: float) -> None:
        """End cancelled and expired sequences; pause those whose reader fell behind (freeing their slot) and
        end those paused for longer than the limit."""
        with self._cond:
            waiting = list(self._waiting)
        for seq in [*waiting, *self._prefill, *self._decode]:
            reason = self._reap_reason(seq, now)
            if reason is not None:
                with self._cond:
                    if seq in self._waiting:
                        self._waiting.remove(seq)
                self._finish(seq, error=reason)
        ready = 0
        for seq in list(self._decode):  # a copy: _finish removes from the list
            if seq.buffered_tokens < self.buffer_limit:
                seq.paused_since = 0.0  # the reader made room: if paused, it queues for a slot from now on
                if seq.paused:
                    seq.ready_since = seq.ready_since or now
                    ready += 1
            elif self.cancel_slow_readers or (seq.paused_since and now - seq.paused_since >= self.max_pause):
                self._finish(seq, finish=Finish.SLOW_READER)
            else:
                seq.paused, seq.ready_since = True, 0.0
                seq.paused_since = seq.paused_since or now
                self._release_slot(seq)
        self._ready = ready

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
        """Run up to ``chunk_tokens`` prompt tokens; return the sequences whose prompt is done, with their last
        logits row. Chunks of equal length from different sequences run as one batch."""
        budget, score_budget = self.chunk_tokens, self.score_step_tokens  # the score budget is shared by all calls
        groups: dict[tuple[int, bool], list[Sequence]] = {}
        for seq in self._prefill:
            if budget <= 0:
                break
            n = min(seq.feed.size - seq.fed, budget, score_budget if seq.score else budget)
            if n <= 0:
                continue  # a score pass, and this step's score budget is spent
            budget -= n
            score_budget -= n if seq.score else 0
            groups.setdefault((n, seq.score), []).append(seq)
        ready = []
        for (n, score), seqs in groups.items():
            for batch in ([s] for s in seqs) if score else [seqs]:
                ready.extend(self._prefill_chunk(batch, n))
        return ready

    def _prefill_chunk(self, seqs: list[Sequence], n: int) -> list[tuple[Sequence, np.ndarray]]:
        t0 = time.perf_counter()
        tokens = np.stack([s.feed[s.fed : s.fed + n] for s in seqs])
        score = seqs[0].score
        positions = np.arange(n) if score else np.array([n - 1])
        state = tuple(np.concatenate(parts, axis=1) for parts in zip(*(s.own_state for s in seqs), strict=True))
        logits, state = self.model.run(tokens, positions, state)
        seconds = time.perf_counter() - t0
        self.observer.step("prompt", len(seqs), len(seqs) * n, seconds)
        ready = []
        for i, seq in enumerate(seqs):
            # a copy of its row: a view would keep the whole batch's arrays alive as long as the sequence
            seq.own_state = tuple(s[:, i : i + 1].copy() for s in state) if len(seqs) > 1 else state
            seq.prompt_seconds += seconds
            if score:
                assert seq.score_targets is not None
                targets = seq.score_targets[seq.fed : seq.fed + n]
                seq.score_parts.append(token_logprobs(logits[0], targets))
            seq.fed += n
            if seq.fed == seq.feed.size:
                self._prefill.remove(seq)
                if score:
                    self._finish(seq, finish=Finish.LENGTH)
                else:
                    seq.context.token_count += seq.feed.size
                    ready.append((seq, logits[i, -1]))
        return ready

    # -- one decode step ------------------------------------------------------------------------------------
    def _run_decode(self) -> tuple[list[Sequence], np.ndarray | None]:
        rows = [s for s in self._decode if not s.paused]
        if not rows:
            return [], None
        self._regather(rows)
        tokens = np.fromiter((s.next_token for s in rows), np.int64, len(rows)).reshape(-1, 1)
        t0 = time.perf_counter()
        logits, self._batch_state = self.model.run(tokens, np.zeros(1, np.int64), self._batch_state)
        self.observer.step("decode", len(rows), len(rows), time.perf_counter() - t0)
        for s in rows:
            s.context.token_count += 1
        return rows, logits[:, 0]

    def _regather(self, rows: list[Sequence]) -> None:
        """Make the batch state hold ``rows`` in order (a no-op while the set of decoding sequences is unchanged)."""
        if rows == self._rows:
            return
        index = {id(s): i for i, s in enumerate(self._rows)}
        for s in self._rows:  # keep the state of sequences leaving the batch (paused ones come back later)
            if s not in rows and s.phase is not Phase.DONE:
                i = index[id(s)]
                s.own_state = tuple(b[:, i : i + 1].copy() for b in self._batch_state)
        if all(id(s) in index for s in rows):
            take = np.fromiter((index[id(s)] for s in rows), np.int64, len(rows))
            self._batch_state = tuple(np.take(b, take, axis=1) for b in self._batch_state)
        else:
            parts = [
                tuple(b[:, index[id(s)] : index[id(s)] + 1] for b in self._batch_state)
                if id(s) in index
                else s.own_state
                for s in rows
            ]
            self._batch_state = tuple(np.concatenate(p, axis=1) for p in zip(*parts, strict=True))
        self._rows = list(rows)

    def _row_state(self, seq: Sequence) -> State:
        if seq in self._rows:
            i = self._rows.index(seq)
            return tuple(b[:, i : i + 1].copy() for b in self._batch_state)
        return seq.own_state

    # -- sampling and output ----------------------------------------------------------------------------------
    def stream_interval(self, running: int) -> int:
        """Tokens gathered per stream message at this batch size. A message costs the transport (and the client)
        about as much CPU as a small model's whole decode step, so with ``running`` streams each sends every
        ``running``-th token: about one message per step in all, whatever the concurrency, up to
        ``max_stream_interval`` tokens per message (vLLM's stream interval, sized by the batch). A single
        stream gets every token as it is sampled, and every stream its first token at once."""
        return max(1, min(self.max_stream_interval, running))

    def _sample(self, rows: list[Sequence], logits: np.ndarray) -> None:
        interval = self.stream_interval(len(rows))
        params = [s.params for s in rows]
        rngs = [s.context.rng for s in rows]
        seen = [s.context.seen for s in rows]
        tokens = sample_batch(logits, params, rngs, seen)
        wanted = [i for i, s in enumerate(rows) if s.logprobs]
        chosen = dict(zip(wanted, token_logprobs(logits[wanted], tokens[wanted]).tolist(), strict=True))
        now = time.monotonic()
        tokenizer = self.model.tokenizer
        gaps: list[float] = []
        for i, (seq, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            seq.context.seen[token] = True
            if seq.generated == 0:
                seq.first_token = now
                self.observer.first_token(now - seq.arrived)
                if seq.phase is Phase.PREFILL:  # joins the decode batch at the next regather
                    seq.phase = Phase.DECODE
                    self._decode.append(seq)
            else:
                gaps.append(now - seq.last_token)
            seq.last_token = now
            seq.generated += 1
            seq.next_token = token
            piece = tokenizer.piece(token, seq.previous)
            seq.previous = token
            lps = [TokenLogprob(token, tokenizer.id_to_token[token], chosen[i])] if seq.logprobs else []
            text, stop = seq.stop_matcher.push(piece)
            if stop is None and seq.generated >= seq.max_tokens:
                text += seq.stop_matcher.flush()
            if text or lps:
                seq.outbox.append(Delta(text, lps, 1))
                seq.produced_tokens += 1
            if stop is not None:
                self._finish(seq, finish=Finish.STOP, stop=stop)
            elif seq.generated >= seq.max_tokens:
                self._finish(seq, finish=Finish.LENGTH)
            elif seq.buffered_tokens >= interval or seq.generated == 1:  # the first token never waits
                self._wakes.add(seq)
        self.observer.sampled(len(rows), gaps)

    def _finish(
        self, seq: Sequence, finish: Finish | None = None, stop: str = "", error: TextgenError | None = None
    ) -> None:
        if seq.phase is Phase.DONE:
            return
        ctx = None
        if error is None and not seq.score:
            ctx = seq.context
            if seq.phase is Phase.DECODE:
                ctx.state = self._row_state(seq)
                ctx.pending = seq.next_token
            elif seq.phase is Phase.PREFILL:
                ctx.state = seq.own_state
        if seq in self._prefill:
            self._prefill.remove(seq)
        if seq in self._decode:
            self._decode.remove(seq)
        if seq.phase is not Phase.WAITING:
            del self._live[seq.id]
        self._release_slot(seq)
        seq.phase = Phase.DONE
        seq.result = seq.ending(finish, stop, error, ctx if finish in (Finish.LENGTH, Finish.STOP) else None)
        self.observer.finished(seq)
        self._wakes.add(seq)
