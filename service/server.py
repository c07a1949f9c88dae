"""Wiring: the gRPC server with the TextGeneration service, grpc.health.v1 (overall and per model) and
reflection; TLS and mutual TLS; graceful shutdown (health NOT_SERVING, new calls refused with UNAVAILABLE,
running streams given the grace period, then whatever is left cancelled and the process exits)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.app import App
from service.http_server import HttpServer
from service.models import ModelRegistry
from service.servicer import Servicer, add_to_server
from service.settings import ServerSettings
from textgen.errors import ConfigError
from textgen.v1 import textgen_pb2 as pb

log = logging.getLogger("textgen.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING


def model_health_name(model: str) -> str:
    """The grpc.health.v1 service name that reports one model's health."""
    return f"models/{model}"


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _options(settings: ServerSettings) -> list[tuple[str, int]]:
    keepalive_ms = int(settings.keepalive_seconds * 1000)
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", min(keepalive_ms, 10_000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC proposal A9: connections end after an age, so long-lived clients spread over new replicas
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_seconds * 1000)),
    ]


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    key, cert = settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes()
    ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class TextgenServer:
    def __init__(self, settings: ServerSettings, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else ModelRegistry.load(settings)
        self.app = App(settings, self.registry)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self.http: HttpServer | None = None  # the OpenAI-compatible HTTP API (http_port)
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        settings = self.settings
        server = grpc.aio.server(options=_options(settings))
        self.servicer = Servicer(self.app)
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )
        address = _address(settings.host, settings.port)
        creds = _credentials(settings)
        try:
            port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from None
        if port == 0:
            raise ConfigError(f"cannot listen on {address} (in use, or not an address of this machine)")
        if settings.metrics_port is not None:
            try:
                self.metrics_port = self.app.metrics.serve(settings.host, settings.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {_address(settings.host, settings.metrics_port)}: {exc}"
                ) from None
        if settings.http_port is not None:
            self.http = HttpServer(self.app)
        self.app.start()
        await server.start()
        self._server, self.port = server, port
        if self.http is not None:
            self.http.start()
        for name in ("", SERVICE_NAME, *(model_health_name(m.name) for m in self.registry)):
            await self.health.set(name, SERVING)
        log.info(
            "textgen serving %s on %s (%s)%s",
            ", ".join(f"{m.name}:{m.version} [{', '.join(m.bundle.providers)}]" for m in self.registry),
            _address(settings.host, port),
            "mutual TLS" if settings.tls_client_ca_file else "TLS" if creds else "plaintext",
            f"; metrics on http://{_address(settings.host, self.metrics_port)}/metrics" if self.metrics_port else "",
        )
        if self.http is not None:
            scheme = "https" if self.http.tls else "http"
            log.info("HTTP API (OpenAI-compatible) on %s://%s/v1", scheme, _address(settings.host, self.http.port))
        return port

    async def shutdown(self, grace: float | None = None) -> None:
        """Graceful shutdown; safe to call more than once."""
        if self._stopped.is_set() or self._server is None:
            return
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("shutting down: draining for up to %.1f s", grace)
        await self.health.enter_graceful_shutdown()
        self.app.drain()
        deadline = time.monotonic() + grace
        while self.app.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.app.busy:
            log.warning("grace period over: cancelling what is still running")
        self.app.stop()  # anything left ends with finish reason CANCELLED
        await asyncio.sleep(0.05)  # let the final messages go out
        if self.http is not None:
            await self.http.stop()
        await self._server.stop(grace=1.0)
        await self.servicer.guard.close()
        self.app.metrics.close()
        self._stopped.set()
        log.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


async def _serve_forever(settings: ServerSettings) -> None:
    server = TextgenServer(settings)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.shutdown()))
    await server.wait()


def run(settings: ServerSettings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully (the ``textgen serve`` command)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    asyncio.run(_serve_forever(settings))


class BackgroundServer:
    """A server on its own thread and event loop (tests, benchmarks, embedding in another program)."""

    def __init__(self, settings: ServerSettings, registry: ModelRegistry | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: TextgenServer | None = None
        self._thread = threading.Thread(target=self._main, args=(settings, registry), daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self, settings: ServerSettings, registry: ModelRegistry | None) -> None:
        asyncio.set_event_loop(self._loop)

        async def boot() -> None:
            try:
                self.server = TextgenServer(settings, registry)
                await self.server.start()
            except BaseException as exc:
                self._error = exc
            finally:
                self._ready.set()

        self._loop.run_until_complete(boot())
        if self._error is None:
            assert self.server is not None
            self._loop.run_until_complete(self.server.wait())
        self._loop.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def app(self) -> App:
        assert self.server is not None
        return self.server.app

    def call(self, coro_fn, *args):
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self._loop).result()

    def stop(self, grace: float = 0.0) -> None:
        if self.server is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.shutdown(grace), self._loop).result()
        self._thread.join(10)
