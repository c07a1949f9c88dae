"""Waiting on an HTTP client that may go away: ``until_disconnect`` runs a coroutine and cancels it if the client
disconnects first; ``EventStream`` is a server-sent-events response whose producer is cancelled (and closed, so a
generation behind it ends and frees its batch slot) as soon as the client disconnects, not at its next write, or
when a write waits longer than the pause limit for a client that reads nothing (``WriteGuard``, as for gRPC)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.types import Receive, Scope, Send

from service.write_guard import WriteGuard
from textgen.errors import CancelledError, SlowReaderError

T = TypeVar("T")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """``await work``, cancelled (``CancelledError``, the domain's) if the client disconnects first. The request
    body must have been read: what ``receive`` gives after it is the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # it ends (and settles what it holds) first
    if task.cancelled():
        raise CancelledError("the client disconnected")
    return task.result()


class EventStream:
    """An ASGI response of ``text/event-stream`` events from ``chunks``; ``on_close`` runs however it ends."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], Any], guard: WriteGuard) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.guard = guard

    async def _pump(self, send: Send) -> None:
        # uvicorn's send waits while the socket's buffers are full: without the guard, a client that reads nothing
        # would keep its call (and its place under max_concurrent_rpcs) for ever, after the engine ended its stream
        writer = types.SimpleNamespace(write=send)
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        await self.guard.write(writer, {"type": "http.response.start", "status": 200, "headers": headers})
        async for chunk in self.chunks:
            await self.guard.write(writer, {"type": "http.response.body", "body": chunk, "more_body": True})
        await self.guard.write(writer, {"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(receive, self._pump(send))
        except (CancelledError, OSError):
            pass  # the client went away (seen waiting, or writing: uvicorn's ClientDisconnected): nothing to answer
        except SlowReaderError:
            pass  # (the response is unfinished: uvicorn closes the connection, logging that it is)
        finally:
            await self.chunks.aclose()  # (a producer never started holds its generation until closed)
            self.on_close()
