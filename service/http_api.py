"""The HTTP transport: an OpenAI-compatible API (``POST /v1/completions``, ``GET /v1/models``) and health endpoints
for load balancers (``/health``: alive; ``/health/ready`` and ``/ready``: taking work), on the app and engine the
gRPC transport uses, so batching, sessions, limits and metrics are shared. A Starlette application; the server is
uvicorn on the gRPC server's event loop (service/http_server.py).

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the HTTP status of the domain
error (``textgen.errors.HTTP_STATUS``, the one table)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service import openai_api
from service.app import App
from service.generation import Outcome
from service.models import ServedModel
from service.principals import MAX_PRINCIPAL_CHARS, address_principal
from service.sse import EventStream, guarded, until_disconnect
from service.write_guard import WriteGuard
from textgen.client import PRINCIPAL_METADATA_KEY
from textgen.errors import HTTP_STATUS, CancelledError, InvalidInputError, NotFoundError, TextgenError


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    kind = "rate_limit_error" if status == 429 else kind
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: BaseException) -> JSONResponse:
    """An error as OpenAI's error object with its HTTP status; anything but a domain error is a bug: 500 (and
    logged with its traceback by uvicorn, to which Starlette hands it on)."""
    if isinstance(exc, TextgenError):
        status = HTTP_STATUS.get(exc.status, 500)
        # full or draining: clients (the openai client among them) wait this long before they retry
        headers = {"retry-after": "1"} if status in (429, 503) else None
        return JSONResponse(error_body(status, str(exc), openai_api.param_of(exc), exc.reason), status, headers)
    return JSONResponse(error_body(500, "internal error (logged on the server)", None, "internal"), 500)


class PayloadTooLargeError(InvalidInputError):
    """A request body over max_message_bytes (HTTP 413; INVALID_ARGUMENT as a domain error)."""


class BodyTimeoutError(InvalidInputError):
    """A request body that did not all come within http_idle_seconds (HTTP 408)."""


_DRAINED_LIMITS = 4  # a refused body is read and dropped up to this many times max_message_bytes


async def read_json(request: Request, limit: int, seconds: float) -> Any:
    """The body as JSON, refused (413) as soon as it is known to exceed ``limit`` bytes: by its Content-Length, or
    while it is read, never buffering more than the limit; and refused (408) unless it all comes within
    ``seconds`` (a client sending it a byte at a time must not hold its connection and task for ever)."""
    length = request.headers.get("content-length", "")
    too_large: PayloadTooLargeError | None = None
    if length.isdigit() and int(length) > limit:
        too_large = PayloadTooLargeError(f"request: {length} bytes exceed this server's max_message_bytes ({limit})")
    body = bytearray()
    dropped = 0  # bytes of a refused body read and dropped
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                if too_large is None:
                    body += chunk
                    if len(body) > limit:
                        too_large = PayloadTooLargeError(
                            f"request: the body exceeds this server's max_message_bytes ({limit})"
                        )
                        dropped, body = len(body), bytearray()
                else:
                    dropped += len(chunk)
                # A refused body is still read (and dropped), up to a few times the limit: a connection closed with
                # data unread is reset, and a client still sending its body would get that reset, not its 413.
                if dropped > _DRAINED_LIMITS * limit:
                    break
    except ClientDisconnect:  # (a 500 with a traceback, uncaught): answered 499 to no one, as a cancelled call
        raise CancelledError("the client disconnected before its request's body came") from None
    except TimeoutError:
        if too_large is not None:
            raise too_large from None
        raise BodyTimeoutError(f"request: the body did not all come within {seconds:g} s (http_idle_seconds)") from None
    if too_large is not None:
        raise too_large
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"request: not valid JSON ({exc})") from None
    except RecursionError:  # json's C scanner recurses per level: "[" * 100_000 fits in the body limit
        raise InvalidInputError("request: not valid JSON (nested too deeply)") from None


def principal(request: Request, trust_header: bool) -> str:
    """The caller, as gRPC's ``principal_of`` names it: the trusted proxy's header when trusted, else its address
    (a client certificate's subject is not passed on by uvicorn: over HTTPS with mutual TLS, callers are known by
    address)."""
    if trust_header:
        sent = request.headers.getlist(PRINCIPAL_METADATA_KEY)
        if len(sent) > 1:
            raise InvalidInputError(f"{PRINCIPAL_METADATA_KEY}: sent {len(sent)} times; give it once")
        if sent and sent[0]:
            if len(sent[0]) > MAX_PRINCIPAL_CHARS:
                raise InvalidInputError(f"{PRINCIPAL_METADATA_KEY}: over {MAX_PRINCIPAL_CHARS} characters")
            return "metadata:" + sent[0]
    host, port = request.client or ("", 0)
    return address_principal(f"{'ipv6' if ':' in host else 'ipv4'}:{host}:{port}")


class HttpApi:
    def __init__(self, app: App) -> None:
        self.app = app
        self.ready = False  # set once serving; cleared when draining starts
        self.guard = WriteGuard(app.settings.max_pause_seconds)  # every write's (service/sse.py); closed on stop
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/health/ready", self.readiness, methods=["GET"]),
            Route("/ready", self.readiness, methods=["GET"]),
        ]
        # (domain errors are answers, not failures; an ``Exception`` handler's exception is re-raised and logged)
        handlers = {HTTPException: self._http_error, TextgenError: self._http_error, Exception: self._http_error}
        self.asgi = guarded(Starlette(routes=routes, exception_handlers=handlers), self.guard)  # type: ignore[arg-type]

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):  # no such route, method not allowed
            return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code)
        return error_response(exc)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readiness(self, request: Request) -> Response:
        if not self.ready or self.app.draining:
            return JSONResponse(error_body(503, "not ready: starting or shutting down", code="unavailable"), 503)
        return JSONResponse({"status": "ready"})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model(m) for m in self.app.registry]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if not name:
            raise NotFoundError("model: name one (GET /v1/models lists them)")
        return JSONResponse(_model(self.app.registry.get(name)))

    async def completions(self, request: Request) -> Response:
        settings = self.app.settings
        try:
            raw = await read_json(request, settings.max_message_bytes, settings.http_idle_seconds)
            body = openai_api.parse_request(raw)
            spec = openai_api.spec_of(body, principal(request, settings.trust_principal_metadata))
        except (PayloadTooLargeError, BodyTimeoutError) as exc:
            # (no "connection: close": closing with the body unread resets the connection, and the client may lose
            # the reply; the connection ends http_idle_seconds later, service/http_server.py)
            status, code = (413, "too_large") if isinstance(exc, PayloadTooLargeError) else (408, "timeout")
            return JSONResponse(error_body(status, str(exc), None, code), status)
        admitted = contextlib.ExitStack()
        try:
            admitted.enter_context(self.app.admission.hold(self.app.admission.weight(spec.n, spec.num_beams)))
            run = self.app.run(spec, asyncio.get_running_loop(), body.timeout)
            if body.stream:
                include_usage = bool((body.stream_options or {}).get("include_usage"))
                chunks = self._chunks(run, await until_disconnect(request.receive, anext(run)), include_usage)
                return EventStream(chunks, admitted.close)
            with admitted:
                return await until_disconnect(request.receive, self._complete(run, spec.logprobs))
        except BaseException:
            admitted.close()
            raise

    async def _complete(self, run: AsyncIterator[Any], logprobs: bool) -> Response:
        """The unary reply, refused (as gRPC's over max_message_bytes) as soon as its JSON would exceed the limit:
        encoding 16 candidates' 4096 tokens with 20 log-probabilities each (25 MB) held the event loop for seconds.
        Its size is counted as the output comes, a wake-up's worth at a time."""
        texts: dict[int, list[str]] = {}
        lps: dict[int, openai_api.Logprobs] = {}
        outcomes: dict[int, Outcome] = {}
        gen, size, limit = None, 0, self.app.settings.max_message_bytes
        async with contextlib.aclosing(run):
            async for gen, items in run:
                for out, outcome in items:
                    texts.setdefault(out.index, []).extend(d.text for d in out.deltas)
                    size += sum(len(d.text) for d in out.deltas)
                    if logprobs:
                        size += len(json.dumps(lps.setdefault(out.index, openai_api.Logprobs()).add(out.deltas)))
                    if size > limit:
                        spec = gen.spec
                        field = "n" if spec.n > 1 else "num_beams" if spec.num_beams > 1 else "max_tokens"
                        raise InvalidInputError(
                            f"{field}: the reply is over this server's max_message_bytes ({limit}); stream it "
                            '("stream": true), or ask for fewer candidates, tokens or log-probabilities'
                        )
                    if outcome is not None:
                        outcomes[out.index] = outcome
                if len(outcomes) == gen.n:
                    break
            assert gen is not None
            reply = openai_api.envelope(gen.model.name, gen.model.version)
            reply["choices"] = [
                {
                    "index": i,
                    "text": "".join(texts.get(i, [])),
                    "logprobs": lps[i].since() if i in lps else None,
                    "finish_reason": openai_api.finish_reason(outcomes[i]),
                    "textgen": openai_api.choice_extension(outcomes[i]),
                }
                for i in sorted(outcomes)
            ]
            reply["usage"] = openai_api.usage(list(outcomes.values()))
            self.app.commit(gen)
        return JSONResponse(reply)

    async def _chunks(self, run: AsyncIterator[Any], first: Any, include_usage: bool) -> AsyncIterator[bytes]:
        """The stream's server-sent events: a chunk per candidate per wake-up, ``data: [DONE]`` at the end."""
        async with contextlib.aclosing(run):
            gen, items = first
            head = openai_api.envelope(gen.model.name, gen.model.version)
            lps: dict[int, openai_api.Logprobs] = {}
            outcomes: list[Outcome] = []
            try:
                while True:
                    for out, outcome in items:
                        logprobs = lps.setdefault(out.index, openai_api.Logprobs()) if gen.spec.logprobs else None
                        choice: dict[str, Any] = {
                            "index": out.index,
                            "text": "".join(d.text for d in out.deltas),
                            "logprobs": logprobs.add(out.deltas) if logprobs is not None else None,
                            "finish_reason": None,
                        }
                        if outcome is not None:
                            outcomes.append(outcome)
                            choice["finish_reason"] = openai_api.finish_reason(outcome)
                            choice["textgen"] = openai_api.choice_extension(outcome)
                        yield _event({**head, "choices": [choice]})
                    if len(outcomes) == gen.n:
                        break
                    gen, items = await anext(run)
                if include_usage:
                    yield _event({**head, "choices": [], "usage": openai_api.usage(outcomes)})
                yield b"data: [DONE]\n\n"
                self.app.commit(gen)  # the transport took the last final chunk
            except TextgenError as exc:  # the status line is sent: the error is the stream's last event
                yield _event(json.loads(error_response(exc).body))
                yield b"data: [DONE]\n\n"


def _model(m: ServedModel) -> dict[str, Any]:
    return {"id": m.name, "object": "model", "created": 0, "owned_by": "textgen", "textgen": {"version": m.version}}


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


MetricsHook = Callable[[str, int, float], None]


def counted(asgi: Callable[[Scope, Receive, Send], Awaitable[None]], observe: MetricsHook) -> Any:
    """``asgi`` with each HTTP request counted (``observe(path, status, seconds)``) once its response ends."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await asgi(scope, receive, send)
        clock = asyncio.get_running_loop().time
        start, status = clock(), 499  # a response never started: the client went away

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await asgi(scope, receive, sending)
        except BaseException:
            status = 500 if status == 499 else status
            raise
        finally:
            observe(scope["path"], status, clock() - start)

    return wrapped
