"""Waiting on an HTTP client that may go away: ``until_disconnect`` runs a coroutine and cancels it if the client
disconnects first; ``EventStream`` is a server-sent-events response whose producer is cancelled (and closed, so a
generation behind it ends and frees its batch slot) as soon as the client disconnects, not at its next write;
``guarded`` bounds how long any write waits for a client that reads nothing (``WriteGuard``, as for gRPC)."""

from __future__ import annotations

import asyncio
import contextlib
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.types import ASGIApp, Receive, Scope, Send

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

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], Any]) -> None:
        self.chunks = chunks
        self.on_close = on_close

    async def _pump(self, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(receive, self._pump(send))
        except (CancelledError, OSError):
            pass  # the client went away (seen waiting, or writing: uvicorn's ClientDisconnected): nothing to answer
        finally:
            await self.chunks.aclose()  # (a producer never started holds its generation until closed)
            self.on_close()


class _GaveUp(Exception):
    """A write waited past the pause limit: the response is abandoned (not a domain error: Starlette would try to
    answer one, and its response has started)."""


def guarded(asgi: ASGIApp, guard: WriteGuard) -> ASGIApp:
    """``asgi`` whose every write waits at most the pause limit for the client to make room (``WriteGuard``, as
    for gRPC): uvicorn's send waits while the socket's buffers are full, so a client that reads nothing would keep
    its response (a stream's place under max_concurrent_rpcs, or a unary reply's buffer) for ever. An abandoned
    response is unfinished: uvicorn closes its connection."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await asgi(scope, receive, send)
        writer = types.SimpleNamespace(write=send)

        async def sending(message: Any) -> None:
            try:
                await guard.write(writer, message)
            except SlowReaderError:
                raise _GaveUp from None

        with contextlib.suppress(_GaveUp):
            await asgi(scope, receive, sending)

    return wrapped
