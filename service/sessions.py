"""Server-side sessions: contexts kept between calls, in memory, with an idle TTL, a maximum count and a memory
budget in bytes (a context's size is fixed per model, so admission is exact). When the table is full the least
recently used idle session is evicted; if every session is busy the new one is refused (RESOURCE_EXHAUSTED).
Used only from the server's event loop thread, so it needs no lock."""

from __future__ import annotations

import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from service.context import Context
from textgen.errors import FailedPreconditionError, NotFoundError, OverloadedError

_TOMBSTONES = 4096  # recently ended ids remembered, so a late call learns why its session is gone


@dataclass
class Session:
    id: str
    context: Context
    last_used: float
    busy: bool = False
    created: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return self.context.nbytes


class SessionStore:
    def __init__(
        self,
        max_sessions: int,
        memory_bytes: int,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        on_end: Callable[[Session, str], None] | None = None,
    ) -> None:
        self.max_sessions, self.memory_bytes, self.ttl = max_sessions, memory_bytes, ttl_seconds
        self._clock = clock
        self._on_end = on_end
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._ended: OrderedDict[str, str] = OrderedDict()
        self.bytes = 0
        self.ended = Counter[str]()  # by reason: closed, expired, evicted

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, context: Context) -> Session:
        self.sweep()
        need = context.nbytes
        if need > self.memory_bytes or self.max_sessions == 0:
            raise OverloadedError("session table full: sessions are disabled or the memory budget is too small")
        while len(self._sessions) >= self.max_sessions or self.bytes + need > self.memory_bytes:
            victim = next((s for s in self._sessions.values() if not s.busy), None)
            if victim is None:
                raise OverloadedError(
                    f"session table full ({len(self._sessions)} sessions, {self.bytes} bytes) and every session "
                    "is generating"
                )
            self._end(victim, "evicted")
        # a prefix, so an id never starts with "-" (token_urlsafe's alphabet has it) and reads as a CLI flag
        session = Session("s_" + secrets.token_urlsafe(18), context, self._clock())
        self._sessions[session.id] = session
        self.bytes += need
        return session

    def get(self, session_id: str) -> Session:
        self.sweep()
        session = self._sessions.get(session_id)
        if session is None:
            why = self._ended.get(session_id)
            raise NotFoundError(f"session {session_id!r} " + (f"was {why}" if why else "does not exist"))
        session.last_used = self._clock()
        self._sessions.move_to_end(session_id)
        return session

    def model_of(self, session_id: str) -> str | None:
        """The open session's model name, without touching its LRU position or TTL."""
        session = self._sessions.get(session_id)
        return session.context.model.name if session is not None else None

    def acquire(self, session_id: str) -> Session:
        """The session, marked busy for one generation; a second concurrent call is refused."""
        session = self.get(session_id)
        if session.busy:
            raise FailedPreconditionError(f"session {session_id!r} is already generating; one call at a time")
        session.busy = True
        return session

    def release(self, session: Session, context: Context | None = None) -> None:
        """End a generation; ``context`` (on success) replaces the session's context."""
        session.busy = False
        session.last_used = self._clock()
        if context is not None and session.id in self._sessions:
            self.bytes += context.nbytes - session.context.nbytes
            session.context = context

    def close(self, session_id: str) -> None:
        session = self.get(session_id)
        if session.busy:
            raise FailedPreconditionError(f"session {session_id!r} is generating; cancel that call first")
        self._end(session, "closed")

    def sweep(self) -> int:
        """End sessions idle for longer than the TTL; returns how many."""
        cutoff = self._clock() - self.ttl
        stale = [s for s in self._sessions.values() if not s.busy and s.last_used < cutoff]
        for s in stale:
            self._end(s, "expired")
        return len(stale)

    def _end(self, session: Session, reason: str) -> None:
        del self._sessions[session.id]
        self.bytes -= session.nbytes
        self.ended[reason] += 1
        self._ended[session.id] = reason
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        if self._on_end is not None:
            self._on_end(session, reason)
