"""Model work off the engine: one worker thread and one bounded queue per model, for the calls whose work is a short
chain of dependent graph calls on host states (Predict, beam search). Why not through the engine: see
``service.predict``; a beam search also reorders its beams every step (copies state rows between hypotheses),
which the engine's one slot per sequence does not do.

A call's work is a ``Job``: it runs on its model's worker, calls ``check`` before every graph call (so a cancelled
or expired call stops within one graph call), and holds nothing once it returns or raises. Each model has a worker
per ``Job.lane``: a beam search may hold its worker for max_tokens graph calls (seconds), so a keyboard's Predict
calls must not queue behind one. At most one job per model and lane runs at a time; at most ``max_queue`` wait
behind it (beyond: RESOURCE_EXHAUSTED); none is accepted while the server drains, and shutting down cancels every
job."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from service.models import ServedModel, State
from textgen.errors import CancelledError, DeadlineExceededError, OverloadedError, TextgenError, UnavailableError

if TYPE_CHECKING:
    from service.app import App


class Job:
    """One call's model work; subclasses define ``run`` (on the worker thread)."""

    what = "working"  # for the deadline's message: "deadline exceeded while <what>"
    lane = "predict"  # jobs of one lane run one at a time, in order; another lane's run beside them

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        self.deadline: float | None = None  # time.monotonic() value
        self.cancel_reason: TextgenError | None = None  # set from the event loop; read between graph calls

    def check(self) -> None:
        if self.cancel_reason is not None:
            raise self.cancel_reason
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceededError(f"deadline exceeded while {self.what}")

    def run(self) -> Any:
        raise NotImplementedError


class ModelWorkers:
    """The app's off-engine model work: one worker thread and one bounded queue per model and lane."""

    def __init__(self, app: App) -> None:
        self.app = app
        # by (model, lane), made on a lane's first job
        self._workers: dict[tuple[str, str], ThreadPoolExecutor] = {}
        self._jobs: dict[tuple[str, str], set[Job]] = {}  # queued or running
        self._running: dict[tuple[str, str], Job] = {}
        self._stopped = False

    @property
    def idle(self) -> bool:
        return not any(self._jobs.values())

    def running(self, model: str) -> Job | None:
        """A job one of ``model``'s workers runs now, if any."""
        return next((job for (name, _), job in list(self._running.items()) if name == model), None)

    def stop(self) -> None:
        self._stopped = True
        for key, worker in list(self._workers.items()):
            for job in list(self._jobs[key]):
                job.cancel_reason = CancelledError("the server is shutting down")
            worker.shutdown(wait=False, cancel_futures=True)

    async def submit(self, job: Job, time_remaining: float | None = None) -> Any:
        """Run ``job`` on its model's worker and return what it returns; a cancelled await cancels the job."""
        name = job.model.name
        key = (name, job.lane)
        jobs = self._jobs.setdefault(key, set())
        if len(jobs) > self.app.settings.max_queue:
            raise OverloadedError(f"model {name}: worker queue full ({len(jobs)} calls waiting); retry later")
        if self.app.draining:
            raise UnavailableError("server is shutting down; retry on another replica")
        if self._stopped:
            raise CancelledError("the server is shutting down")
        if time_remaining is not None:
            job.deadline = time.monotonic() + time_remaining

        def run() -> Any:
            self._running[key] = job
            try:
                return job.run()
            finally:
                del self._running[key]
                jobs.discard(job)  # only once the worker is done with it: ``idle`` means no model work left

        jobs.add(job)
        try:
            worker = self._workers.get(key)
            if worker is None:
                worker = self._workers[key] = ThreadPoolExecutor(1, f"model-work-{name}-{job.lane}")
            future = worker.submit(run)
        except RuntimeError:  # shut down
            jobs.discard(job)
            raise CancelledError("the server is shutting down") from None
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            job.cancel_reason = CancelledError("the client cancelled or disconnected")
            if future.cancel():  # never started: nothing will discard it
                jobs.discard(job)
            raise


def run_context(
    model: ServedModel, state: State, feed: np.ndarray, chunk: int, check: Any
) -> tuple[np.ndarray, State, State]:
    """Run ``feed`` (at least one token) from ``state`` (batch 1), in chunks of ``chunk`` tokens so a long context
    stops soon when cancelled (``check`` before each graph call). Returns the logits after the last token
    [1, vocab], the state after all of ``feed`` but its last token (a context's state keeps its last token pending)
    and the state after all of it."""
    head = feed[:-1]
    nowhere = np.zeros(0, np.int64)  # no logits wanted: the output projection is skipped (half a word model's call)
    for start in range(0, head.size, chunk):
        check()
        _, state = model.run(head[None, start : start + chunk], nowhere, state)
    check()
    logits, after = model.run(feed[None, -1:], np.zeros(1, np.int64), state)
    return logits[:, 0], state, after
