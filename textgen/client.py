"""Python client for a textgen server, sync (``Client``) and asyncio (``AsyncClient``).

    with Client("127.0.0.1:50051") as client:
        for piece in client.stream_text("def ", max_tokens=200, temperature=0.7, seed=1):
            print(piece, end="", flush=True)

Every call raises ``RemoteError`` (a ``TextgenError`` carrying the server's status code and message) on failure.
Both clients speak the ``textgen.v1`` protocol through the generated stubs; nothing here needs torch or ONNX."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from textgen.errors import TextgenError
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


class RemoteError(TextgenError):
    """A call the server refused or failed; ``status`` is the gRPC status name (e.g. ``INVALID_ARGUMENT``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.status = code.name
        self.code = code
        self.details = details


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


def channel_credentials(
    root_certificates: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials: the CA to trust (None: the system's), and a client certificate for mutual TLS."""

    def read(p: Path | None) -> bytes | None:
        return Path(p).read_bytes() if p else None

    return grpc.ssl_channel_credentials(read(root_certificates), read(client_key), read(client_cert))


class _Base:
    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None, timeout: float | None, aio: bool):
        mod = grpc.aio if aio else grpc
        options = [("grpc.max_receive_message_length", 64 << 20)]
        self.channel = (
            mod.secure_channel(target, credentials, options) if credentials else mod.insecure_channel(target, options)
        )
        self.stub = pb_grpc.TextGenerationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout


class Client(_Base):
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(target, credentials, timeout, aio=False)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _remote(exc) from None

    def generate(self, prompt: str = "", **options: Any) -> pb.GenerateResponse:
        return self._call(self.stub.Generate, generate_request(prompt, **options))

    def stream(self, prompt: str = "", **options: Any) -> Iterator[pb.GenerateStreamResponse]:
        """The stream's messages; the last one has ``complete`` set. Closing the iterator cancels the call."""
        call = self.stub.GenerateStream(generate_request(prompt, **options), timeout=self.timeout)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise _remote(exc) from None
        finally:
            call.cancel()

    def stream_text(self, prompt: str = "", **options: Any) -> Iterator[str]:
        for msg in self.stream(prompt, **options):
            if msg.text:
                yield msg.text

    def score(self, text: str, model: str = "", token_logprobs: bool = False) -> pb.ScoreResponse:
        return self._call(self.stub.Score, pb.ScoreRequest(model=model, text=text, token_logprobs=token_logprobs))

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest()).models)

    def get_model(self, model: str = "") -> pb.ModelInfo:
        return self._call(self.stub.GetModel, pb.GetModelRequest(model=model))

    def create_session(self, model: str = "", seed: int | None = None, snapshot: bytes = b"") -> pb.SessionInfo:
        return self._call(self.stub.CreateSession, pb.CreateSessionRequest(model=model, seed=seed, snapshot=snapshot))

    def fork_session(self, session_id: str, seed: int | None = None) -> pb.SessionInfo:
        return self._call(self.stub.ForkSession, pb.ForkSessionRequest(session_id=session_id, seed=seed))

    def close_session(self, session_id: str) -> None:
        self._call(self.stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))

    def health(self, service: str = "") -> str:
        """The health status name (``SERVING``, ``NOT_SERVING``, ...) of the server or of ``models/<name>``."""
        reply = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class AsyncClient(_Base):
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(target, credentials, timeout, aio=True)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _remote(exc) from None

    async def generate(self, prompt: str = "", **options: Any) -> pb.GenerateResponse:
        return await self._call(self.stub.Generate, generate_request(prompt, **options))

    async def stream(self, prompt: str = "", **options: Any) -> AsyncIterator[pb.GenerateStreamResponse]:
        call = self.stub.GenerateStream(generate_request(prompt, **options), timeout=self.timeout)
        try:
            async for msg in call:
                yield msg
        except grpc.RpcError as exc:
            raise _remote(exc) from None
        finally:
            call.cancel()

    async def stream_text(self, prompt: str = "", **options: Any) -> AsyncIterator[str]:
        async for msg in self.stream(prompt, **options):
            if msg.text:
                yield msg.text

    async def score(self, text: str, model: str = "", token_logprobs: bool = False) -> pb.ScoreResponse:
        return await self._call(self.stub.Score, pb.ScoreRequest(model=model, text=text, token_logprobs=token_logprobs))

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self._call(self.stub.ListModels, pb.ListModelsRequest())).models)

    async def get_model(self, model: str = "") -> pb.ModelInfo:
        return await self._call(self.stub.GetModel, pb.GetModelRequest(model=model))

    async def create_session(self, model: str = "", seed: int | None = None, snapshot: bytes = b"") -> pb.SessionInfo:
        request = pb.CreateSessionRequest(model=model, seed=seed, snapshot=snapshot)
        return await self._call(self.stub.CreateSession, request)

    async def fork_session(self, session_id: str, seed: int | None = None) -> pb.SessionInfo:
        return await self._call(self.stub.ForkSession, pb.ForkSessionRequest(session_id=session_id, seed=seed))

    async def close_session(self, session_id: str) -> None:
        await self._call(self.stub.CloseSession, pb.CloseSessionRequest(session_id=session_id))

    async def health(self, service: str = "") -> str:
        reply = await self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
