"""The stream-write watchdog (``service/write_guard.py``) ends a call as a slow reader only when its write really
waited past the limit: not a write the transport took in the same tick, not a call cancelled for another reason,
and on Python 3.10 too.

The tests drive a ``WriteGuard`` with a stand-in for ``context.write`` (a future the test completes) and a
stand-in clock for the guard module only (the event loop keeps the real one). The clock is what the watchdog
reads once per tick, so the test acts *inside* that tick, on the same loop iteration, instead of racing it with
sleeps: nothing here depends on the machine's speed."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from typing import Any

import pytest

from service import write_guard
from service.write_guard import WriteGuard
from textgen.errors import SlowReaderError

LIMIT = 0.004  # the watchdog checks every LIMIT / 4 = 1 ms; the stand-in clock decides what it sees
_TASKS: list[asyncio.Task[None]] = []  # the handler tasks started, so a test can cancel one as gRPC would


class _Context:
    """``context.write`` that waits until the test says the transport took the message."""

    def __init__(self, taken: asyncio.Future[None]) -> None:
        self.taken = taken

    async def write(self, message: Any) -> None:
        await self.taken


def _clock_acting_in_tick(guard: WriteGuard, act: Callable[[], None]) -> types.SimpleNamespace:
    """A ``time`` for the guard module: writes begin at 0; the watchdog's first tick with a write in progress
    first runs ``act`` (something that happens on that same loop iteration), then sees the limit long past."""
    state = {"acted": False}

    def monotonic() -> float:
        if asyncio.current_task() is guard._watchdog and guard._writing and not state["acted"]:
            state["acted"] = True
            act()
            return 1000.0
        return 0.0

    return types.SimpleNamespace(monotonic=monotonic)


async def _write_through(guard: WriteGuard, taken: asyncio.Future[None]) -> tuple[str, int]:
    """Run one guarded write on its own task (as a gRPC handler does); how it ended, and its pending cancel count."""
    outcome: dict[str, Any] = {}

    async def handler() -> None:
        try:
            await guard.write(_Context(taken), b"message")
            outcome["how"] = "returned"
        except SlowReaderError:
            outcome["how"] = "SlowReaderError"
        except asyncio.CancelledError:
            outcome["how"] = "CancelledError"
            outcome["cancelling"] = asyncio.current_task().cancelling()  # type: ignore[union-attr]
            raise
        outcome["cancelling"] = asyncio.current_task().cancelling()  # type: ignore[union-attr]

    task = asyncio.get_running_loop().create_task(handler())
    _TASKS.append(task)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    finally:
        await guard.close()
    return outcome["how"], outcome["cancelling"]


def test_a_write_the_transport_took_as_the_limit_passed_is_delivered_not_a_slow_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The transport takes the message (the write's future completes) in the same loop iteration as the watchdog's
    tick that finds the write past the limit: the handler's wake-up is queued, not yet run. The watchdog's
    ``task.cancel()`` then lands on a write that has already succeeded, and the guard reports SlowReaderError for
    a message the client has received. For the final message that means the client holds ``complete`` (with
    its session id or snapshot) while the call ends CANCELLED and the session is not committed, against the
    README's "a streamed call commits once the transport has taken its last message". ``asyncio.wait_for``,
    which this replaced, returns the result when the inner write finished by the time the timeout is handled."""

    async def scenario() -> tuple[str, int]:
        guard = WriteGuard(LIMIT)
        taken = asyncio.get_running_loop().create_future()
        monkeypatch.setattr(write_guard, "time", _clock_acting_in_tick(guard, lambda: taken.set_result(None)))
        return await _write_through(guard, taken)

    how, _ = asyncio.run(scenario())
    assert how == "returned", f"a write the transport took ended the call as a slow reader ({how})"


def test_a_cancel_from_elsewhere_in_the_same_tick_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client cancels (or the server's shutdown cancels the handler) on the same loop iteration as the
    watchdog expires the write: two cancel requests, one CancelledError delivered. The guard takes it as its own,
    calls ``uncancel()`` once and raises SlowReaderError, so the other request is lost: the call is counted
    ``slow_reader`` instead of ``cancelled``, and the task is left with ``cancelling() == 1`` and no
    cancellation coming (on 3.11 an ``asyncio.timeout`` later in that task would then turn its own expiry into
    a CancelledError). Only a write whose ``uncancel()`` leaves no request pending is the guard's alone."""

    async def scenario() -> tuple[str, int]:
        guard = WriteGuard(LIMIT)
        loop = asyncio.get_running_loop()
        taken = loop.create_future()  # never taken: the client reads nothing

        def client_cancels() -> None:
            _TASKS[-1].cancel()  # what gRPC does to the handler's task when its client cancels

        monkeypatch.setattr(write_guard, "time", _clock_acting_in_tick(guard, client_cancels))
        return await _write_through(guard, taken)

    _TASKS.clear()
    how, cancelling = asyncio.run(scenario())
    assert how == "CancelledError", (
        f"the client's cancel was swallowed: the write raised {how} with cancelling() == {cancelling} left on the task"
    )


def test_the_watchdog_works_on_python_3_10(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyproject.toml says ``requires-python = ">=3.10"`` (ruff targets py310; the README: "Python 3.10+"), but
    ``Task.uncancel`` is new in 3.11. On 3.10 every write the watchdog expires raises AttributeError from the
    guard's ``except CancelledError`` branch: the servicer logs an internal error and answers INTERNAL instead of
    ending the call as a slow reader (and ``textgen bench soak`` fails on any INTERNAL). Emulated here with a task
    class that lacks ``uncancel``, as 3.10's does."""

    class Py310Task(asyncio.Task):  # type: ignore[type-arg]
        @property
        def uncancel(self) -> Any:
            raise AttributeError("'_asyncio.Task' object has no attribute 'uncancel'")

    async def scenario() -> str:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(lambda loop, coro, **kw: Py310Task(coro, loop=loop, **kw))
        guard = WriteGuard(LIMIT)
        taken = loop.create_future()  # never taken: the client reads nothing
        monkeypatch.setattr(write_guard, "time", _clock_acting_in_tick(guard, lambda: None))
        try:
            how, _ = await _write_through(guard, taken)
        except AttributeError as exc:
            return f"AttributeError: {exc}"
        return how

    _TASKS.clear()
    how = asyncio.run(scenario())
    assert how == "SlowReaderError", f"an expired write on Python 3.10 ends with {how}"
