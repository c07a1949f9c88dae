"""The pause limit on stream writes, enforced by one watchdog task instead of a timer per message.

A stream write waits while the client's flow-control window is full; a client that reads nothing for
``max_pause_seconds`` must not keep its call (and its place under ``max_concurrent_rpcs``) for ever. Wrapping every
write in ``asyncio.wait_for`` costs a task per message (about 60 us, measured, where a small model's whole decode
step is 150 us) and ``asyncio.timeout`` a timer handle (about 20 us). Here a write costs two dict operations, and a
watchdog, waking every ``limit / 4`` (at most every second), cancels the calls whose write has waited past the
limit; their write raises ``SlowReaderError``. A call ends between ``limit`` and ``limit`` plus one check period
after its write began."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from textgen.errors import SlowReaderError


class WriteGuard:
    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._writing: dict[asyncio.Task[Any], float] = {}  # calls in a write, with when it began
        self._expired: set[asyncio.Task[Any]] = set()
        self._watchdog: asyncio.Task[None] | None = None

    async def write(self, context: Any, message: Any) -> None:
        """``context.write(message)``, ended with ``SlowReaderError`` if it waits longer than the limit."""
        task = asyncio.current_task()
        assert task is not None
        if self._watchdog is None:  # started by the first write, on the serving loop
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        self._writing[task] = time.monotonic()
        try:
            await context.write(message)
        except asyncio.CancelledError:
            if task not in self._expired:
                raise
            self._expired.discard(task)
            # Python 3.11+ counts cancel requests: take back ours; one left over is someone else's (the client
            # cancelled, the server shuts down) and wins. 3.10 has no count: ours is the only one we can know of.
            uncancel = getattr(task, "uncancel", None)
            if uncancel is not None and uncancel() > 0:
                raise
            raise SlowReaderError(f"the client read nothing for {self.limit:g} s (max_pause_seconds)") from None
        finally:
            self._writing.pop(task, None)
            self._expired.discard(task)

    async def _watch(self) -> None:
        period = min(1.0, self.limit / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for task, began in list(self._writing.items()):
                if now - began < self.limit or task in self._expired:
                    continue
                # A write the transport completed on this same loop iteration has delivered its message: the
                # task is only waiting to resume. (``_fut_waiter``, the future a task awaits, is private; the C
                # and Python Task both have it, 3.10 to 3.13.)
                waiting_on = getattr(task, "_fut_waiter", None)
                if waiting_on is not None and waiting_on.done():
                    continue
                self._expired.add(task)
                task.cancel()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
