"""A container health probe: one grpc.health.v1 Check against the local server. Exit status 0 when the service
reports SERVING, 1 otherwise with one line on stderr. Used by the Docker HEALTHCHECK and compose
(``python -m service.healthprobe``), where grpc_health_probe cannot be installed.

It follows the server's own settings, read from the environment when it runs: ``TEXTGEN_HOST``/``TEXTGEN_PORT``
for the address, and when ``TEXTGEN_TLS_CERT_FILE`` is set it speaks TLS. It then trusts the server's own
certificate chain (``--ca`` names a CA bundle instead) and checks the name in that certificate, since the
certificate is for the name clients use, not 127.0.0.1. Under mutual TLS (``TEXTGEN_TLS_CLIENT_CA_FILE``) it
presents the server's own certificate and key as its client identity. That works when the certificate chains to
the client CA and allows client authentication (no extended key usage, or clientAuth among them); otherwise
``--cert``/``--key`` name a client certificate for the probe."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

_ANY_ADDRESS = {"", "0.0.0.0", "::", "[::]"}


class ProbeError(Exception):
    """The probe cannot be set up (a file it needs is missing or unusable): one line for stderr."""


@dataclass
class Target:
    address: str
    credentials: grpc.ChannelCredentials | None = None  # None: plaintext
    server_name: str | None = None  # the name to verify in the server's certificate, if not the address's host


def default_address(environ: Mapping[str, str]) -> str:
    """The server's own listening address, or loopback when it listens on every interface."""
    host = environ.get("TEXTGEN_HOST", "127.0.0.1").strip()
    if host in _ANY_ADDRESS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{environ.get('TEXTGEN_PORT', '50051')}"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ProbeError(f"cannot read {what} {path}: {exc.strerror}") from None


def _certificate(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(pem)[0]  # the leaf comes first in a chain file
    except ValueError:
        raise ProbeError(f"{what} holds no PEM certificate") from None


def certificate_name(cert: x509.Certificate) -> str | None:
    """A name the certificate is valid for: its first DNS name (a wildcard's with a label put in), else its first
    IP address, else its common name."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        dns = san.get_values_for_type(x509.DNSName)
        if dns:
            return "probe." + dns[0][2:] if dns[0].startswith("*.") else dns[0]
        ips = san.get_values_for_type(x509.IPAddress)
        if ips:
            return str(ipaddress.ip_address(ips[0]))
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else None


def allows_client_auth(cert: x509.Certificate) -> bool:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no restriction
    return ExtendedKeyUsageOID.CLIENT_AUTH in usages


def target(
    environ: Mapping[str, str],
    address: str | None = None,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    server_name: str | None = None,
) -> Target:
    """How to reach the server that ``environ`` configures (its ``TEXTGEN_*`` settings) with the flags' overrides."""
    address = address or default_address(environ)
    server_cert = Path(environ["TEXTGEN_TLS_CERT_FILE"]) if environ.get("TEXTGEN_TLS_CERT_FILE") else None
    if server_cert is None and ca is None:
        return Target(address)
    server_pem = _read(server_cert, "TEXTGEN_TLS_CERT_FILE") if server_cert is not None else None
    roots = _read(ca, "--ca") if ca is not None else server_pem
    if server_name is None and server_pem is not None:
        server_name = certificate_name(_certificate(server_pem, str(server_cert)))
    if (cert is None) != (key is None):
        raise ProbeError("--cert and --key go together")
    chain = private_key = None
    if cert is not None and key is not None:
        chain, private_key = _read(cert, "--cert"), _read(key, "--key")
    elif environ.get("TEXTGEN_TLS_CLIENT_CA_FILE") and server_pem is not None:
        # Mutual TLS: the server's own identity, when its certificate may be used by a client.
        chain = server_pem
        if not allows_client_auth(_certificate(chain, str(server_cert))):
            raise ProbeError(
                f"mutual TLS is on and the server's certificate {server_cert} does not allow client authentication "
                "(extended key usage): give the probe a client certificate with --cert and --key"
            )
        key_path = environ.get("TEXTGEN_TLS_KEY_FILE", "")
        private_key = _read(Path(key_path), "TEXTGEN_TLS_KEY_FILE")
    credentials = grpc.ssl_channel_credentials(roots, private_key, chain)
    return Target(address, credentials, server_name)


def check(probe: Target | str, service: str = "", timeout: float = 5.0) -> str:
    """The status name (``SERVING``, ``NOT_SERVING``, ...) that the server reports for ``service``."""
    probe = Target(probe) if isinstance(probe, str) else probe
    if probe.credentials is None:
        channel = grpc.insecure_channel(probe.address)
    else:
        options = [("grpc.ssl_target_name_override", probe.server_name)] if probe.server_name else []
        channel = grpc.secure_channel(probe.address, probe.credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.healthprobe", description=__doc__)
    address = default_address(environ)
    parser.add_argument("--address", default=address, help="host:port (default: %(default)s)")
    parser.add_argument("--service", default="", help='health service name ("" = the whole server)')
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: 5)")
    parser.add_argument("--ca", type=Path, help="CA bundle to trust (default: the server's TEXTGEN_TLS_CERT_FILE)")
    parser.add_argument("--cert", type=Path, help="client certificate for mutual TLS (default: the server's own)")
    parser.add_argument("--key", type=Path, help="the --cert's private key (default: TEXTGEN_TLS_KEY_FILE)")
    parser.add_argument(
        "--server-name", help="name to verify in the server's certificate (default: the first name in it)"
    )
    return parser


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    args = _parser(environ).parse_args(argv)
    where = f"healthprobe: {args.address} service {args.service!r}"
    try:
        probe = target(environ, args.address, args.ca, args.cert, args.key, args.server_name)
        status = check(probe, args.service, args.timeout)
    except ProbeError as exc:
        print(f"healthprobe: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        details = f": {exc.details()}" if exc.details() else ""
        print(f"{where}: {exc.code().name}{details}".replace("\n", " "), file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"{where}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
