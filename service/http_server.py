"""The HTTP API's server (service/http_api.py): uvicorn on the gRPC server's running event loop (no thread or loop
of its own, so the API drives the app exactly as the gRPC handlers do), on its own port, with the gRPC server's TLS
certificate and key (and client CA: mutual TLS). It stops with the gRPC server: readiness turns 503 and new
requests are refused with 503 while the server drains (``App.draining``, ``service.admission``), then open
connections are closed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.app import App
from service.http_api import HttpApi, counted
from textgen.errors import ConfigError


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave signals to textgen's own handlers: SIGTERM drains the whole server (gRPC and HTTP alike)."""
        yield


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a watch on slow clients, every timeout_keep_alive (http_idle_seconds) from
    the connection's opening or its last response: the connection is aborted unless a request is being answered
    or the client took some of what waits to be sent since the last look. uvicorn times only connections idle
    after a response (a byte received stops that timer), so a client that sent nothing, or its headers a byte at a
    time (slowloris), held its connection (a file descriptor gRPC needs too) for ever; and one that reads nothing
    held its reply (up to max_message_bytes, queued whole in the transport) for ever, a close waiting to flush it."""

    _timer: asyncio.TimerHandle | None = None
    _pending = 0  # bytes waiting to be sent at the last look

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def _watch(self, pending: int = 1 << 62) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._pending = pending
        self._timer = self.loop.call_later(self.timeout_keep_alive, self._look)

    def _look(self) -> None:
        self._timer = None
        pending = self.transport.get_write_buffer_size()
        answering = self.cycle is not None and not self.cycle.response_complete and not self.transport.is_closing()
        if answering or 0 < pending < self._pending:  # (a stalled stream's writes are WriteGuard's, service/sse.py)
            self._watch(pending)
        else:
            self.transport.abort()


def _listen(host: str, port: int) -> socket.socket:
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        dual = host == "::" and socket.has_dualstack_ipv6()  # as gRPC's [::]: IPv4 clients too
        sock = socket.create_server((host, port), family=family, backlog=2048, dualstack_ipv6=dual)
    except OSError as exc:
        raise ConfigError(f"cannot serve the HTTP API on {host}:{port}: {exc}") from None
    # Nagle's algorithm off (connections inherit it from the listening socket): asyncio turns it off only for
    # sockets made with protocol IPPROTO_TCP, and create_server's are made with 0, so every stream's second and
    # later small writes waited for the client's delayed ACK, about 40 ms (a first token 45 ms late against 3).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class HttpServer:
    def __init__(self, app: App) -> None:
        settings = app.settings
        self.api = HttpApi(app)
        config = uvicorn.Config(
            counted(self.api.asgi, app.metrics.http),
            ssl_certfile=settings.tls_cert_file,
            ssl_keyfile=settings.tls_key_file,
            ssl_ca_certs=settings.tls_client_ca_file,
            ssl_cert_reqs=ssl.CERT_REQUIRED if settings.tls_client_ca_file else ssl.CERT_NONE,
            lifespan="off",
            access_log=False,
            log_config=None,  # the process's logging (service/server.py) applies
            http=_Protocol,
            timeout_keep_alive=settings.http_idle_seconds,
            timeout_graceful_shutdown=1.0,  # streams were given the grace period while the app drained
            # an HTTP/1.1 connection's request line and headers (the body is bounded by the API: max_message_bytes)
            h11_max_incomplete_event_size=64 * 1024,
        )
        self._server = _Server(config)
        self._socket = _listen(settings.host, settings.http_port or 0)
        self.port: int = self._socket.getsockname()[1]
        self.tls = settings.tls_cert_file is not None
        self._task: asyncio.Task[None] | None = None

    @property
    def connections(self) -> int:
        """HTTP connections open now."""
        return len(self._server.server_state.connections)

    def start(self) -> None:
        """Serve on the running loop (the socket already listens: connections wait in its backlog meanwhile)."""
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._socket]))
        self.api.ready = True

    async def stop(self) -> None:
        self.api.ready = False
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
        await self.api.guard.close()
