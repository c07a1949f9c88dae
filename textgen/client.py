"""Python client for a textgen server, sync (``Client``) and asyncio (``AsyncClient``).

    with Client("127.0.0.1:50051") as client:
        for piece in client.stream_text("def ", max_tokens=200, temperature=0.7, seed=1):
            print(piece, end="", flush=True)

Several replicas (``"10.0.0.1:50051,10.0.0.2:50051"`` or ``"dns:///textgen:50051"``) are balanced call by call,
and with ``failover=True`` a generation whose replica fails continues on another one with exactly the text it
would have produced (textgen/failover.py).

Several candidates of one prompt (``n=4``): ``generate`` returns them in ``reply.candidates``; a stream tags each
message with its candidate's ``index``, and ``gather`` folds its messages into the same ``Candidate`` list.

Every call raises ``RemoteError`` (a ``TextgenError`` carrying the server's status code and message) on failure.
Both clients speak the ``textgen.v1`` protocol through the generated stubs; nothing here needs torch or ONNX."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from textgen.errors import ConfigError, TextgenError
from textgen.failover import SHUT_DOWN, Failover, Interrupted
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
# Request metadata naming the caller (its principal) for per-client limits such as the session quota; the server
# trusts it only as far as the proxy that sets it (see service/principals.py), and mutual TLS overrides it.
PRINCIPAL_METADATA_KEY = "x-textgen-principal"


class RemoteError(TextgenError):
    """A call the server refused or failed; ``status`` is the gRPC status name (e.g. ``INVALID_ARGUMENT``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.status = code.name
        self.code = code
        self.details = details


# gRPC's own client-side balancing: a call goes to the next ready replica, and a replica that goes away is skipped
# (grpc doc/load-balancing.md). The default, pick_first, would send everything to one replica.
_ROUND_ROBIN = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))


def _literal(address: str) -> str:
    """``host:port`` with a numeric host, as gRPC's ``ipv4:``/``ipv6:`` targets need it; ConfigError otherwise."""
    host, _, port = address.strip().rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"server {address!r}: expected HOST:PORT")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ConfigError(
            f"server {address!r}: a list of replicas takes IP addresses; for names use one dns:///NAME:PORT target, "
            "whose every address is a replica"
        ) from None
    return f"{host}:{port}"


def channel_target(target: str) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target and extra channel options for ``target``: one ``HOST:PORT`` (or any gRPC target) as is;
    several replicas as ``HOST:PORT,HOST:PORT,...`` (IP addresses) or a ``dns:///NAME:PORT`` name with several
    addresses, balanced call by call with gRPC's ``round_robin`` policy."""
    if "," in target:
        addresses = [_literal(a) for a in target.split(",") if a.strip()]
        scheme = "ipv6" if all(a.startswith("[") for a in addresses) else "ipv4"
        if scheme == "ipv4" and any(a.startswith("[") for a in addresses):
            raise ConfigError(f"server {target!r}: gRPC takes one address family per list (all IPv4 or all [IPv6])")
        return f"{scheme}:{','.join(addresses)}", [_ROUND_ROBIN]
    if target.startswith("dns:"):
        return target, [_ROUND_ROBIN]
    return target, []


def _remote(exc: grpc.RpcError) -> RemoteError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (details or "").lower():
        details = f"cannot reach the server ({details})"
    return RemoteError(code, details or "")


def generate_request(prompt: str = "", **options: Any) -> pb.GenerateRequest:
    """A ``GenerateRequest``; options are its fields (``max_tokens``, ``temperature``, ``seed``, ``stop``,
    ``session_id``, ``snapshot``, ``return_snapshot``, ...). ``None`` leaves a field unset."""
    return pb.GenerateRequest(prompt=prompt, **{k: v for k, v in options.items() if v is not None})


def gather(messages: Iterable[pb.GenerateStreamResponse]) -> list[pb.Candidate]:
    """A stream's messages gathered per candidate (``GenerateRequest.n``), by index: each candidate's text, log-
    probabilities, token ids and final ``complete``, as ``Generate`` returns them in ``candidates``."""
    parts: dict[int, tuple[list[str], pb.Candidate]] = {}
    for msg in messages:
        if msg.index not in parts:
            parts[msg.index] = ([], pb.Candidate(index=msg.index))
        text, candidate = parts[msg.index]
        text.append(msg.text)
        candidate.logprobs.extend(msg.logprobs)
        candidate.token_ids.extend(msg.token_ids)
        if msg.HasField("complete"):
            candidate.complete.CopyFrom(msg.complete)
    for text, candidate in parts.values():
        candidate.text = "".join(text)
    return [parts[i][1] for i in sorted(parts)]


def _finals(request: pb.GenerateRequest) -> int:
    """The final messages a stream ends after: one per candidate. A beam search's stream (never failed over) is read
    to its end instead (-1): it may have fewer beams than ``n`` to send."""
    return -1 if request.num_beams > 1 else max(1, request.n)


def predict_unit(unit: str) -> int:
    """The ``PredictUnit`` named "token", "word" or "" (the model's default)."""
    try:
        return {"": pb.PREDICT_UNIT_UNSPECIFIED, "token": pb.PREDICT_UNIT_TOKEN, "word": pb.PREDICT_UNIT_WORD}[unit]
    except KeyError:
        raise ConfigError(f"unit: {unit!r} is not token or word") from None


def _same(reply: Any) -> Any:
    return reply


def _status_name(reply: Any) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def channel_credentials(
    root_certificates: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: the CA to trust (None: the system's), and a client certificate for mutual TLS."""

    def read(p: Path | None) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return grpc.ssl_channel_credentials(read(root_certificates), read(client_key), read(client_cert))


class _Base:
    """The unary calls, written once: ``_call`` is a plain call in ``Client`` and a coroutine in ``AsyncClient``,
    so each method here returns the reply (sync) or an awaitable of it (asyncio)."""

    _aio = False

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        principal: str = "",
        failover: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """``failover``: generations survive a replica's failure (textgen/failover.py). ``options``: more gRPC
        channel arguments (keepalive, flow control, ...)."""
        mod = grpc.aio if self._aio else grpc
        target, balancing = channel_target(target)
        options = [("grpc.max_receive_message_length", 64 << 20), *balancing, *options]
        self.channel = (
            mod.secure_channel(target, credentials, options) if credentials else mod.insecure_channel(target, options)
        )
        self.stub = pb_grpc.TextGenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout  # per call; with failover, per generation (resumed calls get what is left)
        self.failover = failover
        # sent with every call; sessions belong to the principal that created them
        self.metadata = ((PRINCIPAL_METADATA_KEY, principal),) if principal else None

    def _call(
        self, method: Any, request: Any, then: Callable[[Any], Any] = _same, retry: Failover | None = None
    ) -> Any:
        raise NotImplementedError

    def _failover(self, request: pb.GenerateRequest, stream: bool) -> Failover:
        return Failover.prepare(request, stream, self.failover)

    def _timeout(self, retry: Failover | None) -> float | None:
        return self.timeout if retry is None else retry.timeout(self.timeout)

    def generate(self, prompt: str = "", **options: Any) -> Any:
        """A ``GenerateResponse``: the whole continuation (with failover: generated again elsewhere, identically,
        if its replica fails); with ``n`` > 1, each candidate in ``candidates`` (not failed over)."""
        retry = self._failover(generate_request(prompt, **options), stream=False)
        return self._call(self.stub.Generate, retry.request, retry=retry if retry.enabled else None)

    def score(self, text: str, model: str = "", token_logprobs: bool = False) -> Any:
        """A ``ScoreResponse``: loss, perplexity and (optionally) per-token log-probabilities of ``text``."""
        return self._call(self.stub.Score, pb.ScoreRequest(model=model, text=text, token_logprobs=token_logprobs))

    def predict(
        self,
        text: str = "",
        num_predictions: int = 0,
        unit: str = "",
        model: str = "",
        session_id: str = "",
        snapshot: bytes = b"",
        return_snapshot: bool = False,
        max_word_chars: int = 0,
    ) -> Any:
        """A ``PredictResponse``: the ``num_predictions`` (0: 3) most likely next words (character models) or
        tokens (word models) after ``text``, most likely first; ``unit`` "token" or "word" chooses. With
        ``return_snapshot`` also the state after ``text``: send it back with only the next keystrokes."""
        return self._call(
            self.stub.Predict,
            pb.PredictRequest(
                model=model,
                text=text,
                session_id=session_id,
                snapshot=snapshot,
                num_predictions=num_predictions,
                unit=predict_unit(unit),
                return_snapshot=return_snapshot,
                max_word_chars=max_word_chars,
            ),
        )

    def list_models(self) -> Any:
        """The served models (``ModelInfo`` list)."""
        return self._call(self.stub.ListModels, pb.ListModelsRequest(), lambda reply: list(reply.models))

    def get_model(self, model: str = "") -> Any:
        return self._call(self.stub.GetModel, pb.GetModelRequest(model=model))

    def create_session(self, model: str = "", seed: int | None = None, snapshot: bytes = b"") -> Any:
        """A ``SessionInfo`` for a new session (from ``snapshot`` when given)."""
        return self._call(self.stub.CreateSession, pb.CreateSessionRequest(model=model, seed=seed, snapshot=snapshot))

    def fork_session(self, session_id: str, seed: int | None = None) -> Any:
        return self._call(self.stub.ForkSession, pb.ForkSessionRequest(session_id=session_id, seed=seed))

    def close_session(self, session_id: str) -> Any:
        return self._call(self.stub.CloseSession, pb.CloseSessionRequest(session_id=session_id), lambda _: None)

    def health(self, service: str = "") -> Any:
        """The health status name (``SERVING``, ``NOT_SERVING``, ...) of the server or of ``models/<name>``."""
        request = health_pb2.HealthCheckRequest(service=service)
        return self._call(self.health_stub.Check, request, _status_name)


class Client(_Base):
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(
        self, method: Any, request: Any, then: Callable[[Any], Any] = _same, retry: Failover | None = None
    ) -> Any:
        while True:
            try:
                reply = method(request, timeout=self._timeout(retry), metadata=self.metadata)
                if retry is None or not retry.cut_short(reply):
                    return then(reply)
                exc: Any = Interrupted(SHUT_DOWN)
            except grpc.RpcError as error:
                exc = error
            delay = retry.next_unary(exc) if retry is not None else None
            if delay is None:
                raise _remote(exc) from None
            time.sleep(delay)

    def stream(self, prompt: str = "", **options: Any) -> Iterator[pb.GenerateStreamResponse]:
        """The stream's messages; the last one has ``complete`` set (with ``n`` > 1: each candidate's last, tagged
        with its ``index``; ``gather`` groups them). Closing the iterator cancels the call. With failover, a broken
        stream is resumed on another replica and its messages simply go on."""
        state = self._failover(generate_request(prompt, **options), stream=True)
        request = state.request
        finals = _finals(request)
        while True:
            call = self.stub.GenerateStream(request, timeout=state.timeout(self.timeout), metadata=self.metadata)
            try:
                for msg in call:
                    out, cut = state.receive(msg)
                    if out is not None:
                        yield out
                    if cut:
                        raise Interrupted(SHUT_DOWN)
                    finals -= msg.HasField("complete")
                    if not finals:
                        return
                if finals < 0:  # a beam search's stream ends after its last beam
                    return
                raise Interrupted()
            except (grpc.RpcError, Interrupted) as exc:
                resumed = state.next_request(exc)
                if resumed is None:
                    raise _remote(exc) from None  # type: ignore[arg-type]
                request, delay = resumed
            finally:
                call.cancel()
            time.sleep(delay)

    def stream_text(self, prompt: str = "", **options: Any) -> Iterator[str]:
        """The text as it arrives (of one candidate: with n > 1, use ``stream`` and each message's ``index``)."""
        for msg in self.stream(prompt, **options):
            if msg.text:
                yield msg.text


class AsyncClient(_Base):
    _aio = True

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(
        self, method: Any, request: Any, then: Callable[[Any], Any] = _same, retry: Failover | None = None
    ) -> Any:
        while True:
            try:
                reply = await method(request, timeout=self._timeout(retry), metadata=self.metadata)
                if retry is None or not retry.cut_short(reply):
                    return then(reply)
                exc: Any = Interrupted(SHUT_DOWN)
            except grpc.RpcError as error:
                exc = error
            delay = retry.next_unary(exc) if retry is not None else None
            if delay is None:
                raise _remote(exc) from None
            await asyncio.sleep(delay)

    async def stream(self, prompt: str = "", **options: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
        state = self._failover(generate_request(prompt, **options), stream=True)
        request = state.request
        finals = _finals(request)
        while True:
            call = self.stub.GenerateStream(request, timeout=state.timeout(self.timeout), metadata=self.metadata)
            try:
                async for msg in call:
                    out, cut = state.receive(msg)
                    if out is not None:
                        yield out
                    if cut:
                        raise Interrupted(SHUT_DOWN)
                    finals -= msg.HasField("complete")
                    if not finals:
                        return
                if finals < 0:  # a beam search's stream ends after its last beam
                    return
                raise Interrupted()
            except (grpc.RpcError, Interrupted) as exc:
                resumed = state.next_request(exc)
                if resumed is None:
                    raise _remote(exc) from None  # type: ignore[arg-type]
                request, delay = resumed
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def stream_text(self, prompt: str = "", **options: Any) -> AsyncIterator[str]:
        async for msg in self.stream(prompt, **options):
            if msg.text:
                yield msg.text
