"""The container health probe against real servers on loopback: plaintext, TLS and mutual TLS, configured only by
the server's own ``TEXTGEN_*`` environment as in the image. The certificates are made here with ``cryptography``:
the server's name is ``textgen.test`` (not 127.0.0.1), so the probe must verify the name in the certificate."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.healthprobe import main
from service.server import BackgroundServer
from service.settings import load_settings

SERVER_NAME = "textgen.test"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


class Authority:
    """A CA (``<name>.pem``) that issues leaf certificates into the same directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir, self.key = directory, ec.generate_private_key(ec.SECP256R1())
        builder = _builder(_name(name), _name(name), self.key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        self.cert = builder.sign(self.key, hashes.SHA256())
        self.path = directory / f"{name}.pem"
        self.path.write_bytes(_pem(self.cert))

    def issue(self, name: str, usages: list[x509.ObjectIdentifier] | None) -> tuple[Path, Path]:
        """``name``.pem (the leaf, then this CA: a chain file) and ``name``.key; ``usages``: extended key usage."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(_name(name), self.cert.subject, key.public_key()).add_extension(
            x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False
        )
        if usages is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        chain, key_file = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        chain.write_bytes(_pem(cert) + _pem(self.cert))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return chain, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    servers, clients = Authority(d, "server-ca"), Authority(d, "client-ca")
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    files = {"server_ca": servers.path, "client_ca": clients.path}
    # The usual internal-CA case: one certificate good for both ends, issued by the CA that clients must chain to.
    files["dual"], files["dual_key"] = clients.issue("dual", both)
    files["server"], files["server_key"] = servers.issue("server", [ExtendedKeyUsageOID.SERVER_AUTH])
    files["client"], files["client_key"] = clients.issue("client", [ExtendedKeyUsageOID.CLIENT_AUTH])
    return files


@pytest.fixture
def serve(served_bundle: Path) -> Iterator[Any]:
    started: list[BackgroundServer] = []

    def start(**tls: Path) -> tuple[BackgroundServer, dict[str, str]]:
        """A server with these TLS settings, and the environment its container would give the probe."""
        settings = load_settings(
            bundle=served_bundle, port=0, providers=["CPUExecutionProvider"], intra_op_threads=1, **tls
        )
        started.append(BackgroundServer(settings))
        env = {"TEXTGEN_HOST": "0.0.0.0", "TEXTGEN_PORT": str(started[-1].port)}
        return started[-1], env | {f"TEXTGEN_{k.upper()}": str(v) for k, v in tls.items()}

    yield start
    for server in started:
        server.stop()


def probe(env: dict[str, str], *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["--timeout", "10", *args], env)
    return code, capsys.readouterr().err


def test_plaintext(serve: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _, env = serve()
    assert probe(env, capsys=capsys) == (0, "")
    assert probe(env, "--service", "models/tiny", capsys=capsys) == (0, "")


def test_tls_with_the_servers_own_settings(
    serve: Any, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, env = serve(tls_cert_file=pki["server"], tls_key_file=pki["server_key"])
    assert probe(env, capsys=capsys) == (0, "")  # trusts the server's chain, checks textgen.test in it
    assert probe(env, "--ca", str(pki["server_ca"]), capsys=capsys) == (0, "")
    code, err = probe(env, "--server-name", "elsewhere.test", capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "UNAVAILABLE" in err
    plain = {k: v for k, v in env.items() if not k.startswith("TEXTGEN_TLS")}
    code, err = probe(plain, capsys=capsys)  # the old probe: plaintext against a TLS server
    assert code == 1 and err.count("\n") == 1 and "UNAVAILABLE" in err


def test_mutual_tls(serve: Any, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # The server's own certificate may act as a client: the probe presents it.
    _, env = serve(tls_cert_file=pki["dual"], tls_key_file=pki["dual_key"], tls_client_ca_file=pki["client_ca"])
    assert probe(env, capsys=capsys) == (0, "")
    # A server-only certificate cannot: the probe says so at once, and takes a client certificate instead.
    _, env = serve(tls_cert_file=pki["server"], tls_key_file=pki["server_key"], tls_client_ca_file=pki["client_ca"])
    code, err = probe(env, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "does not allow client authentication" in err
    client = ("--cert", str(pki["client"]), "--key", str(pki["client_key"]))
    assert probe(env, *client, capsys=capsys) == (0, "")
    # A client certificate from the wrong CA is refused by the server.
    code, err = probe(env, "--cert", str(pki["server"]), "--key", str(pki["server_key"]), capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "UNAVAILABLE" in err
    code, err = probe(env, "--cert", str(pki["client"]), capsys=capsys)
    assert (code, err) == (1, "healthprobe: --cert and --key go together\n")


def test_as_the_container_runs_it(serve: Any, pki: dict[str, Path]) -> None:
    """``python -m service.healthprobe`` in a process of its own: exit status and stderr are the whole interface."""
    _, env = serve(tls_cert_file=pki["dual"], tls_key_file=pki["dual_key"], tls_client_ca_file=pki["client_ca"])
    base = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}

    def run(extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "service.healthprobe", "--timeout", "10", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, env=base | extra)

    ok = run(env)
    assert (ok.returncode, ok.stderr) == (0, "")
    missing = run(env | {"TEXTGEN_TLS_KEY_FILE": "/nonexistent/key.pem"})
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "TEXTGEN_TLS_KEY_FILE" in missing.stderr
    for refused in (
        run({k: v for k, v in env.items() if not k.startswith("TEXTGEN_TLS")}),  # plaintext
        run(env, "--server-name", "elsewhere.test"),  # the server's certificate is not for this name
        run(env, "--cert", str(pki["server"]), "--key", str(pki["server_key"])),  # not from the client CA
    ):
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
