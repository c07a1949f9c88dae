"""A container health probe: one grpc.health.v1 Check against the local server. Exit status 0 when the service
reports SERVING, 1 otherwise with one line on stderr. Used by the Docker HEALTHCHECK and compose
(``python -m service.healthprobe``), where grpc_health_probe cannot be installed."""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _default_address() -> str:
    # The server's own port setting, so the probe follows TEXTGEN_PORT without being told twice.
    return f"127.0.0.1:{os.environ.get('TEXTGEN_PORT', '50051')}"


def check(address: str, service: str = "", timeout: float = 5.0) -> str:
    """The status name (``SERVING``, ``NOT_SERVING``, ...) that ``address`` reports for ``service``."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.healthprobe", description=__doc__)
    parser.add_argument("--address", default=_default_address(), help="host:port (default: %(default)s)")
    parser.add_argument("--service", default="", help='health service name ("" = the whole server)')
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: 5)")
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as exc:
        details = f": {exc.details()}" if exc.details() else ""
        print(f"healthprobe: {args.address} service {args.service!r}: {exc.code().name}{details}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"healthprobe: {args.address} service {args.service!r}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
