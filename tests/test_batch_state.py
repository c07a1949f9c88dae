"""The device-resident batch state against the bundle's own graph run from host arrays: the step graph must give
the same logits and the same new state for any rows in any slots, in any order, and leave every other slot as it
was; rows copied in and out come back bit for bit; the engine frees every slot whatever ends a sequence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from service.batch_state import BatchState
from service.bundle import load_bundle
from service.context import Context
from service.engine import Engine
from service.models import ModelRegistry, ServedModel
from service.sequence import Finish, Sequence
from service.settings import ServerSettings
from textgen.errors import CancelledError
from textgen.sampling import SamplingParams

from live_server import wait_until

CAPACITY = 8


@pytest.fixture(scope="module")
def model(served_bundle: Path) -> ServedModel:
    return next(iter(ModelRegistry.load(ServerSettings(bundle=served_bundle, providers=["CPUExecutionProvider"]))))


@pytest.fixture(scope="module")
def plain(served_bundle: Path):
    """The bundle's graph as exported, run from host arrays: the reference."""
    return load_bundle(served_bundle).session


def _random_state(model: ServedModel, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    layers, hidden = model.state_shape
    return tuple(rng.standard_normal((layers, batch, hidden)).astype(np.float32) for _ in model.state_names)


def _reference(plain, model: ServedModel, tokens, positions, state):
    feeds = {"tokens": tokens, "positions": positions, **dict(zip(model.state_names, state, strict=True))}
    logits, *new = plain.run(None, feeds)
    return logits, new


@pytest.mark.parametrize("time_steps,score", [(1, False), (7, False), (7, True)])
def test_any_slots_in_any_order_match_the_exported_graph(model: ServedModel, plain, time_steps: int, score: bool):
    rng = np.random.default_rng(time_steps)
    pool = model.batch_state(CAPACITY)
    before = _random_state(model, CAPACITY, rng)
    pool.put(list(range(CAPACITY)), before)
    slots = np.array([6, 1, 3], np.int64)  # not contiguous, not sorted
    tokens = rng.integers(0, model.vocab_size, (slots.size, time_steps)).astype(np.int64)
    positions = np.arange(time_steps) if score else np.array([time_steps - 1])

    logits = pool.run(tokens, positions, slots)

    want_logits, want_state = _reference(plain, model, tokens, positions, tuple(s[:, slots] for s in before))
    assert np.array_equal(logits, want_logits)
    after = pool.take(list(range(CAPACITY)))
    for old, new, want in zip(before, after, want_state, strict=True):
        assert np.array_equal(new[:, slots], want)
        others = [i for i in range(CAPACITY) if i not in slots]
        assert np.array_equal(new[:, others], old[:, others])  # untouched


def test_rows_put_and_taken_come_back_exactly(model: ServedModel) -> None:
    rng = np.random.default_rng(0)
    pool = model.batch_state(CAPACITY)
    rows = _random_state(model, 2, rng)
    pool.put([5, 2], rows)
    back = pool.take([5, 2])
    assert all(np.array_equal(a, b) for a, b in zip(rows, back, strict=True))
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for b in back)


@pytest.mark.parametrize("mode", ["dynamic", "static", "graphs"])
def test_steps_of_a_sequence_in_a_moving_slot_match_a_host_loop(model: ServedModel, plain, mode: str) -> None:
    """Twenty decode steps of one row whose batch companions and slot order change every step (the engine's
    case) give the state a host loop of the exported graph gives; also with static shapes (CUDA graphs' fixed
    buffers per power-of-two batch size, padded with a scratch slot) and with the CUDA-graph bucket path (its
    capture runs on the scratch slot, logits read back from a device buffer), run here on CPU sessions."""
    rng = np.random.default_rng(1)
    static = mode != "dynamic"
    if mode == "graphs":
        sessions = dataclasses.replace(model.sessions, cuda_graphs=True)
        pool = BatchState(sessions, model.state_names, model.state_shape, np.float32, model.vocab_size, CAPACITY)
    else:
        pool = model.batch_state(CAPACITY, static_shapes=static)
    pool.put(list(range(CAPACITY)), _random_state(model, CAPACITY, rng))
    pool.put([4], model.zero_state(1))  # the row under test
    state = model.zero_state(1)
    for step in range(20):
        token = int(rng.integers(model.vocab_size))
        others = rng.choice([i for i in range(CAPACITY) if i != 4], size=step % 4, replace=False)
        slots = np.array([*others, 4][:: 1 if step % 2 else -1], np.int64)
        tokens = rng.integers(0, model.vocab_size, (slots.size, 1)).astype(np.int64)
        tokens[list(slots).index(4), 0] = token
        logits = pool.decode(tokens[:, 0], slots)
        want, state = _reference(plain, model, np.array([[token]], np.int64), np.zeros(1, np.int64), state)
        assert np.array_equal(logits[list(slots).index(4)], want[0, 0])
    assert all(np.array_equal(a, b) for a, b in zip(pool.take([4]), state, strict=True))
    if static:
        assert sorted(pool._buckets) == [1, 2, 4]  # 1 to 4 rows ran


def _engine(bundle: Path, **overrides: object) -> Engine:
    settings = ServerSettings(bundle=bundle, providers=["CPUExecutionProvider"], **overrides)
    return Engine(next(iter(ModelRegistry.load(settings))), settings)


def test_every_ending_frees_its_slot(served_bundle: Path) -> None:
    """Finished, cancelled, slow-reader and scoring sequences all give their state slot back."""
    engine = _engine(served_bundle, max_batch_size=4, stream_buffer_tokens=3, slow_reader_policy="cancel")
    model = engine.model
    prompt = np.array(model.tokenizer.encode("the qu"), np.int64)
    done = Sequence(context=Context.fresh(model, 1), feed=prompt, max_tokens=2)
    unread = Sequence(context=Context.fresh(model, 2), feed=prompt, max_tokens=100)
    cancelled = Sequence(context=Context.fresh(model, 3), feed=prompt, max_tokens=10**6, params=SamplingParams())
    scored = Sequence(context=Context.fresh(model, 4), feed=prompt[:-1], score_targets=prompt[1:])
    for seq in (done, unread, cancelled, scored):
        engine.submit(seq)
    engine.start()
    try:
        wait_until(lambda: cancelled.generated > 0, "the endless one is running")
        cancelled.cancel(CancelledError("client went away"))
        wait_until(lambda: all(s.result is not None for s in (done, unread, cancelled, scored)), "all ended")
        wait_until(lambda: engine.idle, "the engine idle")
    finally:
        engine.stop()
    assert done.result.finish is Finish.LENGTH and unread.result.finish is Finish.SLOW_READER
    assert engine.state.free_slots == 4 and engine.running == 0
