"""Client-side balancing over replicas: the client and CLI take several addresses (or a dns:/// name) and spread
calls over every replica with gRPC's round_robin policy; servers age their connections out (gRPC proposal A9) so
long-lived clients reach new replicas."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from service.server import _options
from service.settings import ServerSettings
from textgen.client import Client, channel_target
from textgen.errors import ConfigError

from live_server import Live

CLI = [sys.executable, "-m", "textgen.cli"]
CALL_BOUND = 300  # calls at most before every replica must have had one (round_robin: 3 once all are ready)


def test_targets() -> None:
    assert channel_target("127.0.0.1:50051") == ("127.0.0.1:50051", [])
    target, options = channel_target("127.0.0.1:1, 127.0.0.2:2")
    assert target == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert json.loads(dict(options)["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert channel_target("[::1]:1,[::1]:2")[0] == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///textgen:50051")[1] == options
    with pytest.raises(ConfigError, match="dns:///NAME:PORT"):
        channel_target("replica-a:50051,replica-b:50051")
    with pytest.raises(ConfigError, match="one address family"):
        channel_target("127.0.0.1:1,[::1]:2")


def test_servers_age_their_connections_out(served_bundle: Path) -> None:
    options = dict(_options(ServerSettings(bundle=served_bundle)))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 900_000


def test_one_client_spreads_its_calls_over_every_replica(serve: Callable[..., Live]) -> None:
    replicas = [serve() for _ in range(3)]
    recorders = [live.observe() for live in replicas]
    target = ",".join(f"127.0.0.1:{live.server.port}" for live in replicas)
    with Client(target, timeout=60) as client:
        calls = 0
        while calls < CALL_BOUND and not all(r.started for r in recorders):
            client.generate("the ", max_tokens=1, seed=calls)
            calls += 1
        for i in range(30):  # all ready now: round_robin takes them in turn
            client.generate("the ", max_tokens=1, seed=i)
    counts = [len(r.started) for r in recorders]
    assert all(counts), f"calls per replica: {counts}"
    assert max(counts) - min(counts) <= calls, f"calls per replica: {counts}"  # the last 30 went 10, 10, 10


def test_the_cli_takes_replicas(serve: Callable[..., Live]) -> None:
    replicas = [serve() for _ in range(2)]
    target = ",".join(f"127.0.0.1:{live.server.port}" for live in replicas)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "textgen.cli",
            "generate",
            "--server",
            target,
            "--max-tokens",
            "3",
            "--seed",
            "1",
            "--prompt",
            "ab",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    bad = subprocess.run(
        [*CLI, "generate", "--server", "a:1,b:2", "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "dns:///NAME:PORT" in bad.stderr and "Traceback" not in bad.stderr
