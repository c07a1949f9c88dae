"""Exact failover for the client: a stream whose replica fails mid-generation continues on another replica, and
the caller receives exactly the text one uninterrupted stream would have sent (no token lost or repeated).

The protocol (``GenerateRequest.return_token_ids`` and ``resume`` in the proto): the stream is asked for every
token's id and, on its first message, the model version. When the call breaks (the replica died, or the proxy in
front of it reset the stream), the client sends the same request again with ``resume``: the token ids and the
number of characters it received and the version that produced them. The new replica runs them as context,
advances the seeded generator past them and goes on from there (service/resume.py). It needs a seed, so a
request without one gets a random seed here (reported in the final message as usual); a snapshot request
carries its generator in the snapshot. A server-side session lives on one replica, so its streams are not
resumed (use snapshots to carry a conversation across replicas). Nor are requests for several candidates
(``n`` > 1), which the server does not resume: they are sent as they are, and fail as they fail (resume a candidate
as an n = 1 request with its ``Completion.seed``).

A replica that shuts down past its grace period ends what it still runs with FINISH_REASON_CANCELLED: that final
message is a cut like any other (its text goes on from another replica). The caller sees token ids and the model
version only if it asked for them, and the client's timeout bounds the whole generation, as it would bound the
uninterrupted stream: each resumed call gets what is left of it. A resumed call's ``cumulative_logprob`` sums only
the tokens it generated; the client adds those of the messages received before, so the caller gets the whole sum.

The state is a few dozen bytes per call plus the token ids; nothing is stored on any server."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from textgen.v1 import textgen_pb2 as pb

# Tries after the first call breaks. The first goes at once (round_robin has already seen the broken connection
# and picks another replica); each later one waits BACKOFF_SECONDS * 2**(i - 1) (0.1 ... 0.8 s, 1.5 s in all):
# time for a balancer to notice that a replica is gone, bounded so a client never hangs on a dead deployment.
ATTEMPTS = 5
BACKOFF_SECONDS = 0.1
# Details of statuses that mean "the connection to the replica broke", not "the server refused": grpc-core's
# words for a stream reset by a proxy (nginx resets its client's stream when the upstream replica dies).
_BROKEN = ("rst_stream", "stream removed", "socket closed", "connection reset", "goaway")
SHUT_DOWN = "the replica cancelled the generation (it is shutting down)"


def retryable(exc: grpc.RpcError) -> bool:
    """Whether a failed call may be resumed: the replica or the path to it failed, not the request."""
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(w in details.lower() for w in _BROKEN)


class Interrupted(Exception):
    """A stream that ended without its final message (a proxy may close it cleanly when its upstream dies), or
    a generation its replica cancelled (``SHUT_DOWN``)."""

    def __init__(self, details: str = "the stream ended before its final message") -> None:
        super().__init__(details)

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return str(self.args[0])


@dataclass
class Failover:
    """One call's failover state: the request and what its streams delivered so far."""

    request: pb.GenerateRequest
    token_ids: list[int] = field(default_factory=list)
    text_chars: int = 0
    model_version: str = ""
    attempt: int = 0
    enabled: bool = True
    asked_ids: bool = True  # the caller asked for token ids (and the model version) itself
    deadline: float | None = None  # time.monotonic() value: the first call's deadline, the whole generation's
    logprob_sum: float = 0.0  # of the tokens received so far
    logprob_before: float = 0.0  # of the tokens received before the current call (it resumed after them)

    @classmethod
    def prepare(cls, request: pb.GenerateRequest, stream: bool = True, enabled: bool = True) -> Failover:
        """The request as failover sends it: a stream asks for token ids, and the seed is fixed. Without failover
        (or for a session's call, which is not repeated) the request is sent as the caller made it."""
        if not enabled or request.session_id or request.n > 1 or request.num_beams > 1:
            return cls(request, enabled=False)
        asked = request.return_token_ids
        request = pb.GenerateRequest.FromString(request.SerializeToString())  # the caller's request is not changed
        request.return_token_ids = asked or stream
        if not request.HasField("seed") and not request.snapshot:
            request.seed = secrets.randbits(64)
        return cls(request, asked_ids=asked)

    def timeout(self, timeout: float | None) -> float | None:
        """The next call's timeout: what is left of ``timeout``, counted from the first call."""
        if timeout is None or not self.enabled:
            return timeout
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + timeout
        return max(0.0, self.deadline - now)

    def receive(self, msg: Any) -> tuple[Any | None, bool]:
        """Record a received GenerateStreamResponse. Returns what the caller gets of it (None: nothing it asked
        for) and whether the stream is cut (its replica cancelled it: resume it, ``SHUT_DOWN``)."""
        if not self.enabled:
            return msg, False
        self.token_ids.extend(msg.token_ids)
        self.text_chars += len(msg.text)
        if msg.model_version:
            self.model_version = msg.model_version
        for lp in msg.logprobs:
            self.logprob_sum += lp.logprob
        if self.logprob_before and msg.complete.HasField("cumulative_logprob"):
            msg.complete.cumulative_logprob += self.logprob_before
        cut = self.cut_short(msg)
        if cut:
            msg.ClearField("complete")
        if not self.asked_ids:
            msg.ClearField("token_ids")
            msg.ClearField("model_version")
        return (msg if msg.ByteSize() else None), cut

    def cut_short(self, reply: Any) -> bool:
        """Whether a final message (or a unary reply) says the replica cancelled the generation, shutting down."""
        return self.enabled and reply.complete.finish_reason == pb.FINISH_REASON_CANCELLED

    def next_request(self, exc: BaseException) -> tuple[pb.GenerateRequest, float] | None:
        """The request that resumes the stream after ``exc``, and how long to wait before sending it; None when
        ``exc`` is not a broken connection or the tries are used up (the caller then raises it)."""
        if not self.enabled or not isinstance(exc, (grpc.RpcError, Interrupted)) or not retryable(exc):  # type: ignore[arg-type]
            return None
        if self.attempt >= ATTEMPTS:
            return None
        delay = BACKOFF_SECONDS * 2 ** (self.attempt - 1) if self.attempt else 0.0
        if self.deadline is not None:  # no wait past the deadline (the call then fails with DEADLINE_EXCEEDED)
            delay = min(delay, max(0.0, self.deadline - time.monotonic()))
        self.attempt += 1
        self.logprob_before = self.logprob_sum
        request = pb.GenerateRequest.FromString(self.request.SerializeToString())
        request.resume.CopyFrom(
            pb.Resume(token_ids=self.token_ids, text_chars=self.text_chars, model_version=self.model_version)
        )
        return request, delay

    def next_unary(self, exc: BaseException) -> float | None:
        """For a unary Generate, which delivers nothing before it ends: the wait before sending it again."""
        resumed = self.next_request(exc)
        return None if resumed is None else resumed[1]
