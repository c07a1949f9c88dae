"""Who runs in the next step: admission into batch slots, the prompt chunks of the step, deadlines and
cancellation, and pausing streams whose readers fell behind. It decides; the engine runs what it decides.

A sequence holds a batch slot, and one row of the device-resident state (``service.batch_state``), from
admission until it ends or pauses. A stream whose client stops reading fills its bounded buffer and is paused:
its state row is copied out and its slot freed (``max_batch_size`` counts only sequences that can run); when its
reader makes room it queues for a slot again, in order of readiness with waiting requests, so streams that keep
pausing cannot jump the queue. A pause longer than ``max_pause_seconds`` ends it (SLOW_READER).

The candidates of a request with n > 1 share its prompt: only the first (the leader) queues and runs it; the
others follow it and, once it has run, queue at the front for slots of their own (``fork``). All n count against
the queue from the moment the request is submitted, so a request can never hold more than the queue has room for.

``submit`` is called from the transport; everything else runs on the engine thread."""

from __future__ import annotations

import threading
import time
from collections import deque

from service.batch_state import BatchState
from service.observer import EngineObserver
from service.sequence import Finish, Phase, Sequence
from service.settings import ServerSettings
from textgen.errors import DeadlineExceededError, OverloadedError, TextgenError, UnavailableError

Ending = tuple[Sequence, Finish | None, TextgenError | None]  # a sequence to end, with its finish or its error


class Scheduler:
    def __init__(
        self, name: str, settings: ServerSettings, state: BatchState, observer: EngineObserver, vocab: int
    ) -> None:
        self.name = name
        self.state = state
        self.observer = observer
        self.max_batch = settings.max_batch_size
        self.max_queue = settings.max_queue
        self.chunk_tokens = settings.prefill_chunk_tokens
        self.buffer_limit = settings.stream_buffer_tokens
        self.cancel_slow_readers = settings.slow_reader_policy == "cancel"
        self.max_pause = settings.max_pause_seconds
        # Positions a score pass runs per step: its graph call and log-probabilities cost about positions x vocab.
        self.score_step_tokens = max(1, settings.score_step_logits // vocab)
        self.cond = threading.Condition()
        self.waiting: deque[Sequence] = deque()  # guarded by cond
        self.prefill: list[Sequence] = []
        self.decode: list[Sequence] = []  # includes paused sequences
        self.forked: list[Sequence] = []  # candidates placed this step whose shared prompt has run: they sample next
        self.unforked = 0  # candidates waiting for their leader's prompt (guarded by cond)
        self.admitted = 0  # sequences holding a batch slot
        # Sequences admitted and not finished (paused ones included), by id: a failed step ends each, wherever it was.
        self.live: dict[int, Sequence] = {}
        self.ready = 0  # paused sequences whose reader made room: they queue for a slot like waiting requests
        self.draining = False
        self.stopping = False

    # -- the transport's side ----------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self.cond:
            if self.draining:
                raise UnavailableError("server is shutting down; retry on another replica")
            free = max(0, self.max_batch - self.admitted)
            need = 1 + len(seq.followers)  # (a request's candidates: GenerateRequest.n)
            if len(self.waiting) + self.unforked + self.ready + need > self.max_queue + free:  # paused streams too
                raise OverloadedError(
                    f"model {self.name}: request queue full ({len(self.waiting) + self.unforked} waiting, "
                    f"{self.admitted} running{f'; this request needs {need}' if need > 1 else ''}); retry later"
                )
            self.waiting.append(seq)
            self.unforked += need - 1
            self.cond.notify()

    # -- the engine thread's side --------------------------------------------------------------------------------
    def runnable(self) -> bool:
        return bool(self.waiting or self.prefill or self.forked) or any(not s.paused for s in self.decode)

    def place(self, seq: Sequence) -> None:
        """Copy an admitted sequence's state into a slot (outside ``cond``: a graph call, a device copy on a
        GPU); then it runs. If the copy fails the slot is free again and the caller ends the sequence."""
        seq.slot = self.state.acquire(seq.own_state)
        seq.own_state = ()
        seq.holds_slot = True
        if seq.first_logits is not None:  # a candidate whose shared prompt has run
            self.forked.append(seq)
        elif seq.phase is Phase.PREFILL:
            self.prefill.append(seq)

    def fork(self, followers: list[Sequence]) -> None:
        """Their leader's prompt has run and each holds a copy of its state: they queue for slots of their own,
        ahead of every waiting request (they were counted against the queue when the request came)."""
        with self.cond:
            self.waiting.extendleft(reversed(followers))
            self.unforked -= len(followers)

    def drop_followers(self, count: int) -> None:
        """``count`` candidates end with their leader, before its prompt ran."""
        with self.cond:
            self.unforked -= count

    def release_slot(self, seq: Sequence, keep_state: bool) -> None:
        """Free the slot of ``seq`` (if it holds one), first copying its state row out when it will need it."""
        if seq.holds_slot:
            if keep_state:
                seq.own_state = self.state.take([seq.slot])
            self.state.release(seq.slot)
            seq.slot, seq.holds_slot = -1, False
        if seq.counted:
            seq.counted = False
            self.admitted -= 1

    def admit(self) -> list[Sequence]:
        """Fill free slots in order of readiness: waiting requests by arrival, paused sequences by when their
        reader made room again. Call with ``cond`` held: it only takes them off the queue and counts them (so
        the engine is never idle-looking meanwhile); the engine then ``place``s each, without the lock."""
        now = time.monotonic()
        out: list[Sequence] = []
        ready = sorted((s for s in self.decode if s.paused and s.ready_since), key=lambda s: s.ready_since)
        while (ready or self.waiting) and self.admitted < self.max_batch:
            if ready and (not self.waiting or ready[0].ready_since <= self.waiting[0].arrived):
                seq = ready.pop(0)
                seq.paused, seq.ready_since = False, 0.0
            else:
                seq = self.waiting.popleft()
                if self.reap_reason(seq, now) is not None:
                    self.waiting.appendleft(seq)  # reaped at the next step, with the others
                    break
                seq.phase = Phase.PREFILL
                seq.admitted = now
                self.live[seq.id] = seq
                self.observer.admitted(seq)
            seq.counted = True
            self.admitted += 1
            out.append(seq)
        return out

    @staticmethod
    def reap_reason(seq: Sequence, now: float) -> TextgenError | None:
        if seq.cancel_reason is not None:
            return seq.cancel_reason
        if seq.deadline is not None and now >= seq.deadline:
            return DeadlineExceededError("deadline exceeded while generating")
        return None

    def retire(self, now: float) -> list[Ending]:
        """The cancelled and expired sequences, and the slow readers to end; pause those whose reader fell behind
        (freeing their slot), and note those whose reader made room again."""
        with self.cond:
            waiting = list(self.waiting)
        ending: list[Ending] = []
        for seq in [*waiting, *self.prefill, *self.decode]:
            reason = self.reap_reason(seq, now)
            if reason is not None:  # a waiting one stays queued until it is ended (``remove``)
                ending.append((seq, None, reason))
        ended = {id(seq) for seq, _, _ in ending}
        ready = 0
        for seq in self.decode:
            if id(seq) in ended:
                continue
            if seq.buffered_tokens < self.buffer_limit:
                seq.paused_since = 0.0  # the reader made room: if paused, it queues for a slot from now on
                if seq.paused:
                    seq.ready_since = seq.ready_since or now
                    ready += 1
            elif self.cancel_slow_readers or (seq.paused_since and now - seq.paused_since >= self.max_pause):
                ending.append((seq, Finish.SLOW_READER, None))
            else:
                if not seq.paused:
                    seq.paused = True
                    self.release_slot(seq, keep_state=True)
                seq.ready_since = 0.0
                seq.paused_since = seq.paused_since or now
        self.ready = ready
        return ending

    def plan_prefill(self) -> dict[tuple[int, bool], list[Sequence]]:
        """This step's prompt work: sequences grouped by (chunk length, scoring), at most ``chunk_tokens`` in all
        and ``score_step_tokens`` of scoring (shared by all calls)."""
        budget, score_budget = self.chunk_tokens, self.score_step_tokens
        groups: dict[tuple[int, bool], list[Sequence]] = {}
        for seq in self.prefill:
            if budget <= 0:
                break
            n = min(seq.feed.size - seq.fed, budget, score_budget if seq.score else budget)
            if n <= 0:
                continue  # a score pass, and this step's score budget is spent
            budget -= n
            score_budget -= n if seq.score else 0
            groups.setdefault((n, seq.score), []).append(seq)
        return groups

    def remove(self, seq: Sequence) -> None:
        """Forget an ended sequence, wherever it was, and free its slot."""
        if seq in self.prefill:
            self.prefill.remove(seq)
        if seq in self.decode:
            self.decode.remove(seq)
        if seq in self.forked:
            self.forked.remove(seq)
        if seq.phase is Phase.WAITING:
            with self.cond:
                if seq in self.waiting:
                    self.waiting.remove(seq)
        else:
            self.live.pop(seq.id, None)
        self.release_slot(seq, keep_state=False)

    def leftovers(self) -> list[Sequence]:
        """Everything not yet ended, taken off the queue (the engine is stopping)."""
        with self.cond:
            out = [*self.waiting, *self.prefill, *self.forked, *self.decode]
            self.waiting.clear()
            self.forked.clear()
        return out
