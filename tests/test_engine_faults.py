"""Faults and edge cases of the device-resident engine, found in review: each test states what must hold. Faults
are injected by replacing one method of the engine's ``BatchState`` (as ``live_server.Gate``
does); every wait is on observable state or an event, never on the machine's speed."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from service.context import Context
from service.engine import Engine
from service.models import ModelRegistry, ServedModel
from service.sequence import Sequence
from service.settings import ServerSettings
from textgen.errors import CancelledError
from textgen.sampling import SamplingParams

from live_server import CALL_TIMEOUT, ENDLESS, wait_until


def _engine(bundle: Path, **overrides: object) -> Engine:
    settings = ServerSettings(bundle=bundle, providers=["CPUExecutionProvider"], intra_op_threads=1, **overrides)
    return Engine(next(iter(ModelRegistry.load(settings))), settings)


def _reading(engine: Engine, seed: int, max_tokens: int, prompt: str = "the qu", **fields: Any) -> Sequence:
    """A sequence whose reader takes everything as soon as it is handed over (on the engine thread, so it never
    pauses); its text is ``seq.text`` (a list of pieces)."""
    model = engine.model
    feed = np.array(model.tokenizer.encode(prompt) if prompt else [model.tokenizer.start_id], np.int64)
    holder: list[Sequence] = []

    def ready() -> None:
        deltas, _ = holder[0].take()
        holder[0].text.extend(d.text for d in deltas)  # type: ignore[attr-defined]
        holder[0].lps.extend(t.logprob for d in deltas for t in d.logprobs)  # type: ignore[attr-defined]

    seq = Sequence(context=Context.fresh(model, seed), feed=feed, max_tokens=max_tokens, on_ready=ready, **fields)
    seq.text, seq.lps = [], []  # type: ignore[attr-defined]
    holder.append(seq)
    return seq


def _fail_next_put(engine: Engine) -> None:
    """The engine's next row copy into its pool raises, as an ONNX Runtime error (a CUDA OOM, say) would."""
    state = engine.state
    real = state.put
    armed = [True]

    def put(slots: list[int], rows: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise RuntimeError("injected: the row copy into the pool failed")
        real(slots, rows)

    state.put = put  # type: ignore[method-assign]


def _hold_puts(engine: Engine) -> tuple[threading.Event, threading.Event]:
    """Row copies into the pool wait (inside the copy) until the second event is set; the first is set on entry."""
    state = engine.state
    real = state.put
    inside, release = threading.Event(), threading.Event()

    def put(slots: list[int], rows: Any) -> None:
        inside.set()
        if not release.wait(CALL_TIMEOUT):
            raise AssertionError("the held put was never released")
        real(slots, rows)

    state.put = put  # type: ignore[method-assign]
    return inside, release


# -- a failed row copy at admission (scheduler.admit / BatchState.acquire) ---------------------------------------


def test_a_row_copy_that_fails_at_admission_fails_its_request_and_frees_its_slot(served_bundle: Path) -> None:
    """A row copy into the pool that fails at admission fails that request (INTERNAL) and gives its slot back.
    (It once leaked the slot and left the request running in slot -1, which Gather/ScatterND wrap to the pool's
    last row: a success with a wrong text.)"""
    engine = _engine(served_bundle, max_batch_size=2)
    _fail_next_put(engine)
    seq = _reading(engine, seed=1, max_tokens=5)
    engine.submit(seq)
    engine.start()
    try:
        wait_until(lambda: seq.result is not None, "the request ended")
        wait_until(lambda: engine.idle, "the engine idle")
    finally:
        engine.stop()
    assert seq.result is not None
    outcome = (seq.result.finish, seq.result.error is not None, engine.state.free_slots)
    assert outcome == (None, True, 2), f"(finish, failed, free slots) = {outcome}: ran in no slot of its own"


def test_after_a_failed_row_copy_no_two_sequences_share_a_state_row(served_bundle: Path) -> None:
    """After a failed row copy, a full batch still admits: every sequence runs in a slot of its own. (With the
    slot leaked, a full batch popped an empty free list and failed every running sequence.)"""
    engine = _engine(served_bundle, max_batch_size=2)
    _fail_next_put(engine)
    first = _reading(engine, seed=1, max_tokens=3)
    engine.submit(first)
    engine.start()
    a, b = _reading(engine, seed=2, max_tokens=ENDLESS), _reading(engine, seed=3, max_tokens=ENDLESS)
    try:
        wait_until(lambda: first.result is not None and engine.idle, "the first request ended")
        engine.submit(a)
        wait_until(lambda: a.generated > 0, "a is decoding")
        engine.submit(b)
        wait_until(lambda: b.generated > 0 or b.result is not None, "b admitted")
        rows = (a.result is None, b.result is None, sorted((a.slot, b.slot)))
    finally:
        engine.stop()
    assert rows == (True, True, [0, 1]), f"(a alive, b alive, their slots) = {rows}"


def test_a_failed_row_copy_out_while_pausing_still_ends_the_requests_reaped_in_that_step(served_bundle: Path) -> None:
    """A cancelled request still queued ends with a result even when the same step's pause (a row copy out) fails:
    it stays queued until it is ended. (Taken off the queue first, it was once lost: no result, never counted.)"""
    engine = _engine(served_bundle, max_batch_size=1, stream_buffer_tokens=3)
    model = engine.model
    feed = np.array(model.tokenizer.encode("the qu"), np.int64)
    unread = Sequence(context=Context.fresh(model, 1), feed=feed, max_tokens=ENDLESS, on_ready=lambda: None)
    queued = _reading(engine, seed=2, max_tokens=5)
    state = engine.state
    real_run = state.decode
    held, go = threading.Event(), threading.Event()

    def run(*args: Any, **kwargs: Any) -> Any:
        if unread.generated == 2 and not held.is_set():  # the step that makes the token filling its buffer
            held.set()
            if not go.wait(CALL_TIMEOUT):
                raise AssertionError("never released")
        return real_run(*args, **kwargs)

    def take(slots: list[int]) -> Any:
        raise RuntimeError("injected: the row copy out of the pool failed")

    state.decode = run  # type: ignore[method-assign]
    engine.submit(unread)
    engine.start()
    try:
        assert held.wait(CALL_TIMEOUT), "the unread stream never ran"
        engine.submit(queued)  # waits: the only slot is the unread stream's
        queued.cancel(CancelledError("the client went away"))
        state.take = take  # type: ignore[method-assign]
        go.set()
        wait_until(lambda: unread.result is not None and engine.idle, "the failed step recovered")
    finally:
        go.set()
        engine.stop()
    assert queued.result is not None, "a cancelled request was dropped without a result"


# -- graph calls under the scheduler's lock (scheduler.admit runs put with cond held) ------------------------------


@contextlib.contextmanager
def _mid_admission(bundle: Path) -> Iterator[Engine]:
    """An engine held inside the row copy of a request it is admitting (its ``put``), released on exit."""
    engine = _engine(bundle)
    inside, release = _hold_puts(engine)
    engine.submit(_reading(engine, seed=1, max_tokens=3))
    engine.start()
    try:
        assert inside.wait(CALL_TIMEOUT), "the engine never copied a row in"
        yield engine
    finally:
        release.set()
        engine.stop()


def test_the_engine_runs_no_graph_under_the_lock_the_transport_takes(served_bundle: Path) -> None:
    """``submit`` and ``wake`` run on the server's event loop and take ``scheduler.cond``: the engine must not hold
    it during a graph call (a row copy in is a host->device copy and a sync on a GPU), or the event loop stalls
    behind every admission burst."""
    with _mid_admission(served_bundle) as engine:
        free = engine.scheduler.cond.acquire(blocking=False)  # what submit() would need now
        if free:
            engine.scheduler.cond.release()
    assert free, "the transport's submit() would block until the engine's graph call returns"


def test_a_request_being_admitted_keeps_the_engine_busy(served_bundle: Path) -> None:
    """While its row is being copied in (ONNX Runtime releases the GIL), an admitted request counts as running:
    a graceful shutdown polling ``app.busy`` must give it the grace period, and the metrics must show it."""
    with _mid_admission(served_bundle) as engine:
        seen = (engine.idle, engine.queued + engine.running + engine.paused)
    assert seen == (False, 1), f"(idle, queued + running + paused) = {seen} while a request is being admitted"


# -- row copies out (engine._finish) -------------------------------------------------------------------------------


def test_a_plain_generation_copies_no_state_row_out(serve: Callable[..., Any]) -> None:
    """README: "a row is copied out only when a session, a snapshot or a paused stream needs it": a generation
    without either copies none (on a GPU each is a graph call, a device->host copy and a sync)."""
    live = serve()
    state = live.engine.state
    real = state.take
    takes: list[list[int]] = []

    def take(slots: list[int]) -> Any:
        takes.append(list(slots))
        return real(slots)

    state.take = take  # type: ignore[method-assign]
    reply = live.generate("the qu", max_tokens=5, seed=1)  # no session, no snapshot, read as it comes
    assert reply.complete.generated_tokens == 5
    assert takes == [], f"rows copied out for a generation that keeps no context: {takes}"


# -- static shapes (CUDA graphs' buckets, run here on the CPU as tests/test_batch_state.py does) ----------------


def _static(engine: Engine) -> Engine:
    """The engine with the static-shape pool that --cuda-graphs implies (the code path, on the CPU)."""
    engine.state = engine.scheduler.state = engine.model.batch_state(engine.state.capacity, static_shapes=True)
    return engine


def test_static_shape_logits_are_the_callers_to_keep(served_bundle: Path) -> None:
    """``BatchState.run`` (prompts) returns a fresh array the caller may keep, with static shapes too: only
    ``decode`` reuses its buffers."""
    model = next(iter(ModelRegistry.load(ServerSettings(bundle=served_bundle, providers=["CPUExecutionProvider"]))))
    pool = model.batch_state(4, static_shapes=True)
    pool.put([0, 1], model.zero_state(2))
    first = pool.run(np.array([[model.tokenizer.start_id]], np.int64), np.array([0]), np.array([0]))
    kept = first.copy()
    pool.run(np.array([[5]], np.int64), np.array([0]), np.array([1]))
    assert np.array_equal(first, kept), "the first call's logits changed under the caller"


def test_static_shapes_a_one_token_prompt_beside_a_decoding_stream_samples_its_own_logits(
    served_bundle: Path,
) -> None:
    """A one-token prompt chunk (an empty prompt, a session's pending token, the last token of a chunked prompt)
    beside a decoding stream samples from its own logits, with static shapes: the engine keeps a prompt's logits
    row while the same step decodes, so the two must never share a buffer."""
    params = SamplingParams(temperature=0.8)
    alone = _static(_engine(served_bundle))
    ref = _reading(alone, seed=5, max_tokens=6, prompt="", params=params, logprobs=True)
    alone.submit(ref)
    alone.start()
    try:
        wait_until(lambda: ref.result is not None, "the reference ended")
    finally:
        alone.stop()

    engine = _static(_engine(served_bundle))
    other = _reading(engine, seed=1, max_tokens=ENDLESS)
    seq = _reading(engine, seed=5, max_tokens=6, prompt="", params=params, logprobs=True)
    engine.submit(other)
    engine.start()
    try:
        wait_until(lambda: other.generated > 0, "another stream decoding")
        engine.submit(seq)
        wait_until(lambda: seq.result is not None, "the request ended")
    finally:
        engine.stop()
    assert (seq.text, seq.lps) == (ref.text, ref.lps)  # type: ignore[attr-defined]


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def test_static_buckets_are_powers_of_two_as_the_readme_says(served_bundle: Path) -> None:
    """README: "With --cuda-graphs decode steps run at power-of-two batch sizes (padded)", whatever the capacity
    (the padded rows all use the scratch slot)."""
    model = next(iter(ModelRegistry.load(ServerSettings(bundle=served_bundle, providers=["CPUExecutionProvider"]))))
    pool = model.batch_state(6, static_shapes=True)
    pool.put(list(range(6)), model.zero_state(6))
    for n in range(1, 7):
        pool.run(np.zeros((n, 1), np.int64), np.zeros(1, np.int64), np.arange(n))
    assert all(_is_power_of_two(size) for size in pool._buckets), sorted(pool._buckets)


def test_static_prompts_run_outside_the_captured_graphs_as_the_readme_says(served_bundle: Path) -> None:
    """README: "prompts run outside them": a one-token prompt chunk creates no decode bucket."""
    model = next(iter(ModelRegistry.load(ServerSettings(bundle=served_bundle, providers=["CPUExecutionProvider"]))))
    pool = model.batch_state(4, static_shapes=True)
    pool.put([0], model.zero_state(1))
    pool.run(np.array([[model.tokenizer.start_id]], np.int64), np.array([0]), np.array([0]))  # an empty prompt
    assert pool._buckets == {}, f"a prompt ran in the bucket(s) {sorted(pool._buckets)}"


# -- CUDA graph ids (what ONNX Runtime replays is keyed by gpu_graph_id alone) -------------------------------------


class _GraphIdLog:
    """The step session, noting the gpu_graph_id each call runs under and what it was bound to. ONNX Runtime files
    a call without the entry under its default id 0 (kCudaGraphAnnotationDefault), and -1 is never captured."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.calls: list[tuple[str, Any]] = []

    @staticmethod
    def _id(options: Any) -> str:
        try:
            return options.get_run_config_entry("gpu_graph_id") if options is not None else "0"
        except RuntimeError:
            return "0"

    def io_binding(self) -> Any:
        return self._session.io_binding()

    def run_with_iobinding(self, io: Any, options: Any = None) -> Any:
        self.calls.append((self._id(options), io))  # the binding itself: a captured graph keeps its addresses
        return self._session.run_with_iobinding(io, options)

    def run(self, outputs: Any, feeds: Any, options: Any = None) -> Any:
        self.calls.append((self._id(options), object()))  # host feeds: new device copies every call
        return self._session.run(outputs, feeds, options)


def test_each_cuda_graph_id_is_only_ever_run_with_one_binding(served_bundle: Path) -> None:
    """Under --cuda-graphs ONNX Runtime captures one graph per gpu_graph_id (per thread) and afterwards replays it
    for every call with that id, whatever is bound: each id must only ever run with one binding. (Host-feed calls
    once ran under the default id 0, and every pool numbered its buckets from 0, so a later call could replay a
    graph bound to buffers that were gone.)"""
    model: ServedModel = next(
        iter(ModelRegistry.load(ServerSettings(bundle=served_bundle, providers=["CPUExecutionProvider"])))
    )
    log = _GraphIdLog(model.sessions.step)
    model.sessions = dataclasses.replace(model.sessions, step=log, cuda_graphs=True)  # the path; CPU ignores ids
    model.warm_up()
    pool = model.batch_state(4)  # the engine's pool, say
    pool.put([0, 1, 2], model.zero_state(3))
    for n in (1, 3, 1):
        pool.run(np.zeros((n, 1), np.int64), np.zeros(1, np.int64), np.arange(n))
    bound: dict[str, list[Any]] = defaultdict(list)
    for graph_id, what in log.calls:
        if graph_id != "-1" and not any(what is b for b in bound[graph_id]):
            bound[graph_id].append(what)
    shared = {graph_id: len(whats) for graph_id, whats in bound.items() if len(whats) > 1}
    assert not shared, f"graph ids run with more than one binding: {shared}"
