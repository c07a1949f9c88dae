"""The gRPC transport: converts ``textgen.v1`` messages to and from the app's domain types, and maps domain
errors to gRPC status codes in one place (``_rpc``). Nothing here decides anything about generation."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc._cython import cygrpc

from service.app import App
from service.generation import Generation, Outcome, Output
from service.messages import UNKNOWN_POLICY, completion_of, logprobs_of, model_info, spec_of
from service.metrics import Call
from service.predict_messages import predict_reply, predict_spec_of
from service.principals import principal_of
from service.sequence import Result
from service.stream_messages import stream_messages
from service.write_guard import WriteGuard
from textgen.errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidInputError,
    SlowReaderError,
    TextgenError,
)
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as pb_grpc

log = logging.getLogger("textgen.grpc")


T = TypeVar("T")

# What ``context.write`` raises when the call ended under it (gRPC's own class; a yield-based handler sees the same
# event as a cancellation, which is what it is).
_CallEnded = cygrpc.ExecuteBatchError


def status_code(error: TextgenError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


# A client whose own deadline fires cancels the call a little before the server's copy of that deadline passes (the
# server's started when the request arrived): a cancel this close to the deadline is counted as the deadline.
_DEADLINE_SLACK_SECONDS = 0.25


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_SLACK_SECONDS


def _interrupted(context: grpc.aio.ServicerContext) -> TextgenError:
    """Why a call's task was cancelled under it: its deadline passed, or the client went away."""
    if _deadline_passed(context):
        return DeadlineExceededError("deadline exceeded")
    return CancelledError("the client cancelled or disconnected")


async def _abort(name: str, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call with the error's status (message = the error's text); anything else is a bug: logged,
    INTERNAL."""
    if isinstance(exc, SlowReaderError) or (
        isinstance(exc, (DeadlineExceededError, CancelledError)) and _deadline_passed(context)
    ):
        # A status cannot reach this client: its deadline passed (the transport has sent DEADLINE_EXCEEDED; a
        # status sent now fails and grpc logs that as an error), or it reads nothing (a status would queue behind
        # the unread messages). Ending the task as cancelled lets the transport drop the call.
        raise asyncio.CancelledError
    if isinstance(exc, TextgenError):
        await context.abort(status_code(exc), str(exc))
    log.exception("internal error in %s", name, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name} (logged on the server)")


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """The one place a call ends (``Servicer._ending``): its error mapped to a status and the call counted in
    the metrics exactly once, however it ends. Unary and streaming handlers differ only in how they hand back."""
    name = method.__name__

    if asyncio.iscoroutinefunction(method):

        @functools.wraps(method)
        async def unary(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._ending(name, request, context):
                return await method(self, request, context)

        return unary

    @functools.wraps(method)
    async def stream(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with self._ending(name, request, context):
            async for item in method(self, request, context):
                yield item

    return stream


@dataclasses.dataclass(frozen=True)
class Malformed:
    """Request bytes that are not a valid message of the method's type (invalid UTF-8 in a string, a truncated
    field): handed to the handler instead of failing inside gRPC with UNKNOWN, so the call is answered
    INVALID_ARGUMENT and counted like any other."""

    type_name: str
    reason: str


def _lenient(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Malformed(cls.DESCRIPTOR.full_name, str(exc))

    return parse


def add_to_server(servicer: Servicer, server: grpc.aio.Server) -> None:
    """Register the TextGeneration methods (as the generated ``add_TextGenerationServicer_to_server`` does, but
    with request parsing that never fails inside gRPC: see ``Malformed``)."""
    service = pb.DESCRIPTOR.services_by_name["TextGeneration"]
    handlers = {}
    for method in service.methods:
        kind = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_lenient(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _check_sendable(request: pb.GenerateRequest, reply: pb.GenerateResponse, limit: int) -> None:
    """gRPC fails a reply over the server's send limit (max_message_bytes) only after the call has ended well, with
    a status that looks retryable and its session changed: refuse it here instead, naming what made it large."""
    size = reply.ByteSize()
    if size > limit:
        field = "n" if request.n > 1 else "num_beams" if request.num_beams > 1 else "max_tokens"
        raise InvalidInputError(
            f"{field}: the reply is {size} bytes, over this server's max_message_bytes ({limit}); stream it "
            "(GenerateStream), or ask for fewer candidates, tokens or log-probabilities"
        )


@dataclasses.dataclass
class _Parts:
    """One candidate of a unary Generate, gathered as it comes."""

    text: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    complete: pb.Completion | None = None

    def candidate(self, index: int) -> pb.Candidate:
        return pb.Candidate(
            index=index,
            text="".join(self.text),
            logprobs=self.logprobs,
            complete=self.complete,
            token_ids=self.token_ids,
        )


class Servicer(pb_grpc.TextGenerationServicer):
    def __init__(self, app: App) -> None:
        self.app = app
        self.guard = WriteGuard(app.settings.max_pause_seconds)

    @property
    def in_progress(self) -> int:
        """Calls in progress, over every transport (``service.admission``)."""
        return self.app.admission.in_progress

    @contextlib.asynccontextmanager
    async def _ending(self, name: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        call = self._begin(name, request)
        try:
            if isinstance(request, Malformed):
                raise InvalidInputError(f"request: not a valid {request.type_name} message ({request.reason})")
            with self.app.admission.hold(self._weight(request)):
                yield
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: a stream closed while a message was sent
            call.end(_interrupted(context))
            raise
        except Exception as exc:
            call.end(exc)
            await _abort(name, context, exc)
        call.end()

    def _begin(self, method: str, request: Any) -> Call:
        if not hasattr(request, "model") and not hasattr(request, "session_id"):
            return self.app.metrics.call(method, "")  # about no one model (ListModels)
        return self.app.metrics.call(
            method, self.app.model_label(getattr(request, "model", ""), getattr(request, "session_id", ""))
        )

    def _principal(self, context: grpc.aio.ServicerContext) -> str:
        return principal_of(context, self.app.settings.trust_principal_metadata)

    def _weight(self, request: Any) -> int:
        if not isinstance(request, pb.GenerateRequest):
            return 1
        return self.app.admission.weight(request.n, request.num_beams)

    def _run(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuple[Generation, list[tuple[Output, Outcome | None]]]]:
        spec = spec_of(request, self._principal(context))
        return self.app.run(spec, asyncio.get_running_loop(), context.time_remaining())

    @_rpc
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        logprobs = bool(request.logprobs or request.top_logprobs)  # top_logprobs implies logprobs
        parts: dict[int, _Parts] = {}
        ended = 0
        async for gen, items in self._run(request, context):
            for out, outcome in items:
                got = parts.get(out.index) or parts.setdefault(out.index, _Parts())
                got.text.extend(d.text for d in out.deltas)
                if logprobs:
                    got.logprobs.extend(logprobs_of(out.deltas))
                if request.return_token_ids:
                    got.token_ids.extend(d.token for d in out.deltas if d.token >= 0)  # (-1: text with no token)
                if outcome is not None:
                    got.complete = completion_of(gen.model, outcome)
                    ended += 1
            if ended == gen.n:
                if gen.multiple:
                    reply = pb.GenerateResponse(candidates=[parts[i].candidate(i) for i in sorted(parts)])
                else:
                    got = parts[0]
                    reply = pb.GenerateResponse(
                        text="".join(got.text), logprobs=got.logprobs, complete=got.complete, token_ids=got.token_ids
                    )
                # No await between here and the return: a cancel can no longer reach this call, and the reply is
                # the transport's one final write. A reply at the edge of its deadline is not sent (and changes
                # nothing): the client's own deadline is about to fire, and it would see DEADLINE_EXCEEDED for a
                # call that had changed its session.
                if _deadline_passed(context):
                    raise DeadlineExceededError("deadline exceeded")
                _check_sendable(request, reply, self.app.settings.max_message_bytes)
                self.app.commit(gen)
                return reply
        raise AssertionError("generation ended without a result")

    @_rpc
    async def GenerateStream(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        started: set[int] = set()  # candidates that sent their first message
        ended = 0
        limit = self.app.settings.max_message_bytes
        async for gen, items in self._run(request, context):
            for out, outcome in items:
                version = ""
                if request.return_token_ids and out.index not in started:
                    version = gen.model.version
                    started.add(out.index)
                complete = completion_of(gen.model, outcome) if outcome is not None else None
                ended += complete is not None
                for msg in stream_messages(request, out.index, out.deltas, version, complete, limit):
                    await self._write(context, msg)
                if ended == gen.n:
                    self.app.commit(gen)  # the transport took the last final message

    async def _write(self, context: grpc.aio.ServicerContext, msg: pb.GenerateStreamResponse) -> None:
        """Send one stream message, waiting at most the pause limit for the client to make room (``WriteGuard``):
        a client that reads nothing for that long must not keep its call for ever (the engine has ended its
        sequence by then; this ends the call that waits to deliver the last message)."""
        try:
            await self.guard.write(context, msg)
        except _CallEnded:  # the client cancelled (or its deadline passed) while the message was being sent
            raise asyncio.CancelledError from None

    @_rpc
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        scored = await self.app.score(request.model, request.text, asyncio.get_running_loop(), context.time_remaining())
        model, loss = scored.model, scored.loss
        reply = pb.ScoreResponse(
            token_count=int(scored.token_ids.size),
            loss=loss,
            perplexity=math.exp(min(loss, 700.0)),
            bits_per_char=loss / math.log(2) if model.tokenizer.level.value == "char" else 0.0,
            model=model.name,
            model_version=model.version,
        )
        if request.token_logprobs:
            names = model.tokenizer.id_to_token
            reply.tokens.extend(
                pb.TokenLogprob(token_id=int(t), token=names[int(t)], logprob=float(lp))
                for t, lp in zip(scored.token_ids, scored.logprobs, strict=True)
            )
        return reply

    @_rpc
    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictResponse:
        predictor = self.app.predictor
        done = await predictor.predict(predict_spec_of(request, self._principal(context)), context.time_remaining())
        try:
            reply = predict_reply(done)
            if _deadline_passed(context):  # as Generate: a reply the client will not see changes no session
                raise DeadlineExceededError("deadline exceeded")
            predictor.commit(done)
            return reply
        finally:
            predictor.end(done)

    @_rpc
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ListModelsResponse(models=[model_info(m, UNKNOWN_POLICY) for m in self.app.registry])

    @_rpc
    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return model_info(self.app.registry.get(request.model), UNKNOWN_POLICY)

    def _session_info(self, session: Any) -> pb.SessionInfo:
        ctx = session.context
        return pb.SessionInfo(
            session_id=session.id,
            model=ctx.model.name,
            model_version=ctx.model.version,
            token_count=ctx.token_count,
            state_bytes=ctx.nbytes,
            idle_ttl_seconds=self.app.sessions.ttl,
        )

    @_rpc
    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> Any:
        seed = request.seed if request.HasField("seed") else None
        return self._session_info(
            self.app.create_session(request.model, request.snapshot, seed, self._principal(context))
        )

    @_rpc
    async def ForkSession(self, request: pb.ForkSessionRequest, context: grpc.aio.ServicerContext) -> Any:
        seed = request.seed if request.HasField("seed") else None
        return self._session_info(self.app.fork_session(request.session_id, seed, self._principal(context)))

    @_rpc
    async def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext) -> Any:
        self.app.close_session(request.session_id, self._principal(context))
        return pb.CloseSessionResponse()


__all__ = ["Result", "Servicer", "status_code"]
