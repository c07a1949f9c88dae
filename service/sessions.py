"""Server-side sessions: contexts kept between calls, in memory, owned by the principal that created them (see
service/principals.py), with an idle TTL, a table limit (count and memory bytes) and a per-principal quota.

- A principal at its quota that creates a session evicts its OWN least recently used idle session, never
  another principal's. When the whole table is full, a new session is refused (RESOURCE_EXHAUSTED) instead of
  evicting anyone's, so no client can push out the sessions of others.
- A call naming another principal's session gets NOT_FOUND with the same message as for an id that never
  existed: ids are capabilities, and the answer must not confirm to a guesser that one is live.
- Idle sessions are kept in last-used order (the store's clock only moves forward), so expiry pops from the
  front while stale: O(sessions expired) per call, never a scan of the table. A busy session (generating) is
  taken out of that order until it is released, so it can be neither expired nor evicted.

A context's size is fixed per model, so admission is exact. Used only from the server's event loop thread, so
it needs no lock."""

from __future__ import annotations

import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from service.context import Context
from textgen.errors import FailedPreconditionError, NotFoundError, OverloadedError

_TOMBSTONES = 4096  # recently ended ids remembered, so a late call learns why its session is gone


@dataclass(eq=False)
class Session:
    id: str
    context: Context
    last_used: float
    principal: str = ""
    busy: bool = False
    created: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return self.context.nbytes


@dataclass
class _Owner:
    """One principal's share of the table: every session it holds counts; only idle ones can be evicted."""

    count: int = 0
    bytes: int = 0
    idle: OrderedDict[str, Session] = field(default_factory=OrderedDict)  # least recently used first


class SessionStore:
    def __init__(
        self,
        max_sessions: int,
        memory_bytes: int,
        ttl_seconds: float,
        max_per_principal: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_end: Callable[[Session, str], None] | None = None,
    ) -> None:
        self.max_sessions, self.memory_bytes, self.ttl = max_sessions, memory_bytes, ttl_seconds
        self.max_per_principal = min(max_sessions if max_per_principal is None else max_per_principal, max_sessions)
        # A principal may hold the same share of the memory budget as of the count: one knob, and a client
        # limited to a tenth of the sessions cannot take the whole budget with a big model's sessions.
        self.memory_per_principal = memory_bytes * self.max_per_principal // max_sessions if max_sessions else 0
        self.clock = clock  # monotonic: the idle order is the last-used order only if time never goes back
        self._on_end = on_end
        self._sessions: dict[str, Session] = {}
        self._idle: OrderedDict[str, Session] = OrderedDict()  # every idle session, least recently used first
        self._owners: dict[str, _Owner] = {}
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (principal, reason)
        self.bytes = 0
        self.ended = Counter[str]()  # by reason: closed, expired, evicted
        self.swept = 0  # sessions the expiry has looked at, in all: its cost, for tests

    def __len__(self) -> int:
        return len(self._sessions)

    def usage(self, principal: str) -> tuple[int, int]:
        """The sessions and bytes ``principal`` holds."""
        owner = self._owners.get(principal)
        return (owner.count, owner.bytes) if owner is not None else (0, 0)

    def create(self, context: Context, principal: str = "") -> Session:
        self.sweep()
        need = context.nbytes
        if self.max_sessions == 0 or need > self.memory_per_principal:
            raise OverloadedError(
                "session table full: sessions are disabled on this server, or one session of this model "
                f"({need} bytes) exceeds a client's share of the session memory ({self.memory_per_principal} bytes)"
            )
        owner = self._owners.get(principal) or _Owner()
        victims = self._own_victims(owner, need, principal)
        freed = sum(v.nbytes for v in victims)
        if len(self._sessions) - len(victims) >= self.max_sessions or self.bytes - freed + need > self.memory_bytes:
            raise OverloadedError(
                f"session table full ({len(self._sessions)} of {self.max_sessions} sessions, {self.bytes} of "
                f"{self.memory_bytes} bytes): close sessions you no longer need (CloseSession), retry later (idle "
                f"sessions expire after {self.ttl:g} s), or keep the state client-side with return_snapshot"
            )
        for victim in victims:
            self._end(victim, "evicted")
        # a prefix, so an id never starts with "-" (token_urlsafe's alphabet has it) and reads as a CLI flag
        session = Session("s_" + secrets.token_urlsafe(18), context, self.clock(), principal)
        self._sessions[session.id] = session
        self._owners[principal] = owner
        owner.count += 1
        owner.bytes += need
        self.bytes += need
        self._mark_idle(session)
        return session

    def _own_victims(self, owner: _Owner, need: int, principal: str) -> list[Session]:
        """The principal's least recently used idle sessions that must go for a new one to fit its quota."""
        victims: list[Session] = []
        count, nbytes = owner.count, owner.bytes
        idle = iter(owner.idle.values())
        while count >= self.max_per_principal or nbytes + need > self.memory_per_principal:
            victim = next(idle, None)
            if victim is None:
                raise OverloadedError(
                    f"session quota reached: {principal or 'this client'} holds {owner.count} sessions "
                    f"({owner.bytes} bytes; at most {self.max_per_principal} sessions and "
                    f"{self.memory_per_principal} bytes per client) and every one of them is generating; "
                    "wait for a call to finish or close a session"
                )
            victims.append(victim)
            count, nbytes = count - 1, nbytes - victim.nbytes
        return victims

    def get(self, session_id: str, principal: str | None = None) -> Session:
        """The session, marked as used now. ``principal`` is the caller's; a session it does not own is reported
        exactly like one that does not exist. None skips that check (the server's own look-ups, tests)."""
        self.sweep()
        session = self._sessions.get(session_id)
        if session is None or (principal is not None and session.principal != principal):
            why = ""
            if session is None:  # gone: tell its owner why, and anyone else nothing more than for a made-up id
                owner, reason = self._ended.get(session_id, ("", ""))
                why = reason if principal is None or owner == principal else ""
            if why:
                raise NotFoundError(f"session {session_id!r} was {why}")
            raise NotFoundError(
                f"session {session_id!r} does not exist on this server (sessions live on the replica that created "
                "them: behind a balancer, carry a conversation as a snapshot, which any replica sharing the "
                "snapshot key continues)"
            )
        session.last_used = self.clock()
        if not session.busy:
            self._idle.move_to_end(session_id)
            self._owners[session.principal].idle.move_to_end(session_id)
        return session

    def model_of(self, session_id: str) -> str | None:
        """The open session's model name, without touching its LRU position or TTL (a metrics label only)."""
        session = self._sessions.get(session_id)
        return session.context.model.name if session is not None else None

    def acquire(self, session_id: str, principal: str | None = None) -> Session:
        """The session, marked busy for one generation; a second concurrent call is refused."""
        session = self.get(session_id, principal)
        if session.busy:
            raise FailedPreconditionError(f"session {session_id!r} is already generating; one call at a time")
        session.busy = True
        del self._idle[session_id]  # out of reach of expiry and eviction until released
        del self._owners[session.principal].idle[session_id]
        return session

    def release(self, session: Session, context: Context | None = None) -> None:
        """End a generation; ``context`` (on success) replaces the session's context."""
        if not session.busy:
            return
        session.busy = False
        session.last_used = self.clock()
        if session.id not in self._sessions:
            return
        if context is not None:
            delta = context.nbytes - session.context.nbytes
            self.bytes += delta
            self._owners[session.principal].bytes += delta
            session.context = context
        self._mark_idle(session)

    def close(self, session_id: str, principal: str | None = None) -> None:
        session = self.get(session_id, principal)
        if session.busy:
            raise FailedPreconditionError(f"session {session_id!r} is generating; cancel that call first")
        self._end(session, "closed")

    def sweep(self) -> int:
        """End the sessions idle for longer than the TTL; returns how many. Looks only at those and one more."""
        cutoff = self.clock() - self.ttl
        expired = 0
        while self._idle:
            self.swept += 1
            oldest = next(iter(self._idle.values()))
            if oldest.last_used >= cutoff:
                break
            self._end(oldest, "expired")
            expired += 1
        return expired

    def _mark_idle(self, session: Session) -> None:
        self._idle[session.id] = session
        self._owners[session.principal].idle[session.id] = session

    def _end(self, session: Session, reason: str) -> None:
        del self._sessions[session.id]
        self._idle.pop(session.id, None)
        owner = self._owners[session.principal]
        owner.idle.pop(session.id, None)
        owner.count -= 1
        owner.bytes -= session.nbytes
        if owner.count == 0:
            del self._owners[session.principal]  # a principal with no sessions costs nothing
        self.bytes -= session.nbytes
        self.ended[reason] += 1
        self._ended[session.id] = (session.principal, reason)
        while len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        if self._on_end is not None:
            self._on_end(session, reason)
