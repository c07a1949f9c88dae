"""Where a call's context comes from, for every call that continues a text (Generate, Predict): a fresh context, a
session's (held busy for the call; the caller releases it, changed or not) or a snapshot's; the call's text as token
ids within the prompt limit; the tokens to feed. And the settling of sessions: a call on a session whose previous
generation is still delivering its final message waits for that (briefly), so a client that asks again the moment
it reads a final message finds the session committed, not busy."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.context import Context
from service.models import ModelRegistry, ServedModel
from service.sessions import Session, SessionStore
from service.snapshots import SnapshotCodec
from textgen.errors import FailedPreconditionError, InvalidInputError

# Texts up to this many characters are encoded on the event loop (under 1 ms); longer ones on a worker thread,
# so one huge prompt never holds up the other calls.
INLINE_ENCODE_CHARS = 1024
# How long a call on a session waits for the session's previous generation to settle: its result is there and its
# final message is being delivered (the commit follows delivery, and a fast client may already be asking again).
_SETTLE_WAIT_SECONDS = 5.0


@dataclass
class Opened:
    """A call's context: a copy, so nothing changes until the call commits; the session it came from, if any,
    held busy until the caller releases it (``SessionStore.release``)."""

    model: ServedModel
    context: Context
    session: Session | None = None


class Contexts:
    def __init__(
        self,
        registry: ModelRegistry,
        sessions: SessionStore,
        snapshots: SnapshotCodec,
        encoder: Executor,
        max_prompt_tokens: int,
    ) -> None:
        self.registry, self.sessions, self.snapshots = registry, sessions, snapshots
        self._encoder = encoder
        self._max_prompt_tokens = max_prompt_tokens
        self._settling: dict[str, asyncio.Future[None]] = {}  # session id -> its last generation's settling

    async def open(
        self, model: str, session_id: str = "", snapshot: bytes = b"", principal: str = "", seed: int | None = None
    ) -> Opened:
        """The context a call names: ``session_id``'s (owned by ``principal``; NOT_FOUND before any wait, since a
        wait would tell another principal that the session exists), ``snapshot``'s, or a fresh one seeded with
        ``seed`` (a session's or snapshot's generator is the caller's to reseed)."""
        if session_id and snapshot:
            raise InvalidInputError("session_id, snapshot: give at most one of them")
        if session_id:
            self.sessions.get(session_id, principal)
            await self._settled(session_id)
            session = self.sessions.acquire(session_id, principal)
            served = session.context.model
            if model and model != served.name:
                self.sessions.release(session)
                raise InvalidInputError(f"model: session {session_id!r} belongs to model {served.name}")
            return Opened(served, session.context.copy(), session)
        served = self.registry.get(model)
        ctx = self.snapshots.load(snapshot, served) if snapshot else Context.fresh(served, seed)
        return Opened(served, ctx)

    async def encode(self, model: ServedModel, text: str, field_name: str) -> np.ndarray:
        """``text``'s token ids within the prompt limit (checked before encoding where the length allows it)."""
        limit = self._max_prompt_tokens
        model.check_length(text, field_name, limit)  # what can be refused without encoding is, before queueing
        if len(text) <= INLINE_ENCODE_CHARS:
            return model.encode_prompt(text, field_name, limit)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._encoder, model.encode_prompt, text, field_name, limit)

    @staticmethod
    def feed(model: ServedModel, ctx: Context, ids: np.ndarray) -> np.ndarray:
        """The tokens to run for ``ids`` after ``ctx``: its pending token first; a text's start when there is
        nothing to continue from, as every training text starts."""
        if ctx.pending >= 0:
            ids = np.concatenate([[ctx.pending], ids]).astype(np.int64)
        if ids.size == 0:
            ids = np.array([model.tokenizer.start_id], dtype=np.int64)
        return ids

    def settling(self, session_id: str) -> asyncio.Future[None]:
        """The session's generation is delivering its final message: calls on it wait until ``settled``."""
        future = asyncio.get_running_loop().create_future()
        self._settling[session_id] = future
        return future

    def settled(self, session_id: str, future: asyncio.Future[None]) -> None:
        future.set_result(None)
        if self._settling.get(session_id) is future:
            del self._settling[session_id]

    async def _settled(self, session_id: str) -> None:
        settling = self._settling.get(session_id)
        if settling is None or settling.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(settling), _SETTLE_WAIT_SECONDS)
        except asyncio.TimeoutError:
            raise FailedPreconditionError(
                f"session {session_id!r} is still delivering its previous generation; read it to the end first"
            ) from None
