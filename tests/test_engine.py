"""The engine on its own (no transport): how it hands tokens to streams."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from service.context import Context
from service.engine import Engine
from service.models import ModelRegistry
from service.sequence import Sequence
from service.settings import load_settings


def _deliveries(bundle: Path, streams: int, max_tokens: int) -> list[list[int]]:
    """Run ``streams`` sequences admitted in the same step; for each, the token count of every hand-over."""
    settings = load_settings(bundle=bundle, port=0, providers=["CPUExecutionProvider"], intra_op_threads=1)
    model = next(iter(ModelRegistry.load(settings)))
    engine = Engine(model, settings)
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
