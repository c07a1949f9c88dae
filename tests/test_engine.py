"""The engine on its own (no transport): how it hands tokens to streams, and what bounds a stream nobody reads.
Readers here are plain callbacks on the engine thread, so every count is exact: nothing depends on timing."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from service.context import Context
from service.engine import Engine
from service.models import ModelRegistry
from service.sequence import Finish, Sequence
from service.settings import load_settings

from live_server import ENDLESS, wait_until


def _engine(bundle: Path, **overrides: object) -> Engine:
    settings = load_settings(bundle=bundle, port=0, providers=["CPUExecutionProvider"], intra_op_threads=1, **overrides)
    return Engine(next(iter(ModelRegistry.load(settings))), settings)


def _deliveries(bundle: Path, streams: int, max_tokens: int) -> list[list[int]]:
    """Run ``streams`` sequences admitted in the same step; for each, the token count of every hand-over."""
    engine = _engine(bundle)
    model = engine.model
    done = threading.Semaphore(0)
    sizes: list[list[int]] = []
    for i in range(streams):
        seen: list[int] = []
        sizes.append(seen)
        holder: list[Sequence] = []

        def ready(holder: list[Sequence] = holder, seen: list[int] = seen) -> None:  # on the engine thread
            deltas, result = holder[0].take()
            if deltas:
                seen.append(sum(d.tokens for d in deltas))
            if result is not None:
                done.release()

        feed = np.array([model.tokenizer.start_id], np.int64)
        holder.append(Sequence(context=Context.fresh(model, seed=i), feed=feed, max_tokens=max_tokens, on_ready=ready))
        engine.submit(holder[0])  # all queued before the thread starts: admitted together
    engine.start()
    try:
        for _ in range(streams):
            assert done.acquire(timeout=30)
    finally:
        engine.stop()
    return sizes


def test_a_single_stream_gets_every_token_as_it_is_sampled(served_bundle: Path) -> None:
    assert _deliveries(served_bundle, 1, 20) == [[1] * 20]


def test_under_load_streams_send_their_first_token_at_once_then_one_message_per_step_in_all(
    served_bundle: Path,
) -> None:
    sizes = _deliveries(served_bundle, 6, 40)
    for seen in sizes:
        assert sum(seen) == 40  # nothing lost, nothing repeated
        # the first token goes out alone (time to first token does not wait for the interval), then every 6th
        assert seen == [1, 6, 6, 6, 6, 6, 6, 3]


def test_an_unread_stream_stops_at_its_buffer_resumes_when_read_and_is_cancelled_at_stop(
    served_bundle: Path,
) -> None:
    # What bounds a stream whose reader takes nothing is its buffer, a count of tokens: it stops after exactly
    # stream_buffer_tokens, however fast the machine, and goes on by as many when read. ``stop`` (what the server
    # does when its grace period is over) then ends it as CANCELLED with everything it made.
    engine = _engine(served_bundle, stream_buffer_tokens=8)
    model = engine.model
    feed = np.array([model.tokenizer.start_id], np.int64)
    unread = Sequence(context=Context.fresh(model, seed=5), feed=feed, max_tokens=ENDLESS, on_ready=lambda: None)
    engine.submit(unread)
    engine.start()
    try:
        wait_until(lambda: unread.paused, "the unread stream paused")
        assert unread.generated == 8
        first, _ = unread.take()  # the reader takes it all: room for 8 more
        engine.wake()
        wait_until(lambda: unread.generated == 16 and unread.paused, "paused again after 8 more")
    finally:
        engine.stop()
    rest, result = unread.take()
    assert result is not None and result.finish is Finish.CANCELLED and result.generated_tokens == 16
    text = "".join(d.text for d in first + rest)

    # the pauses changed nothing: the same 16 tokens as a stream read as it comes
    engine = _engine(served_bundle)
    read = Sequence(context=Context.fresh(model, seed=5), feed=feed, max_tokens=16, on_ready=lambda: None)
    engine.submit(read)
    engine.start()
    try:
        wait_until(lambda: read.result is not None, "the read stream finished")
    finally:
        engine.stop()
    deltas, _ = read.take()
    assert text == "".join(d.text for d in deltas)


def test_slow_readers_all_end_in_the_same_step_under_the_cancel_policy(served_bundle: Path) -> None:
    """Three unread streams prefilled together fill their buffers in the same step, and under the cancel policy all
    three end in that step (the engine once removed from the list it was walking, skipping every other one)."""
    engine = _engine(served_bundle, slow_reader_policy="cancel", stream_buffer_tokens=2)
    model = engine.model
    prompt = np.array(model.tokenizer.encode("the qu"), np.int64)
    seqs = [Sequence(context=Context.fresh(model, seed=i), feed=prompt.copy(), max_tokens=100) for i in range(3)]
    steps: list[int] = []
    ends: dict[int, int] = {}

    class Count(type(engine.observer)):  # type: ignore[misc]
        def step(self, phase: str, batch: int, tokens: int, seconds: float) -> None:
            steps.append(batch)
            if phase == "prompt":
                assert batch == 3

        def finished(self, seq: Sequence) -> None:
            ends[seq.id] = len(steps)

    engine.observer = Count()
    for seq in seqs:
        engine.submit(seq)  # queued before the thread starts: admitted, and prefilled, together
    engine.start()
    try:
        wait_until(lambda: all(s.result is not None for s in seqs), "the readers' streams ended")
    finally:
        engine.stop()
    assert all(s.result is not None and s.result.finish is Finish.SLOW_READER for s in seqs)
    assert len(set(ends.values())) == 1  # all in the same step
    # nobody reads: each has exactly its buffer's worth of tokens
    assert [s.generated for s in seqs] == [2, 2, 2]
