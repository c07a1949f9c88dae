"""The images' lock files (deploy/lock, made by `make lock` = scripts/lock.py) must match what they were compiled
from: pyproject.toml's requirements of each image's extras, its build requirements and the Dockerfile's CUDA_LIBS
and TORCH defaults. Every pin must satisfy those requirements and carry hashes, and the Dockerfile must install
from the locks in pip's hash-checking mode. Offline: nothing here resolves or downloads anything."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from test_deploy import _stages

ROOT = Path(__file__).resolve().parent.parent
FIX = "run `make lock` (needs PyPI) and commit deploy/lock"
# The environment the locks target (scripts/lock.py's TARGET), for requirements with markers.
IMAGE_ENV = {"python_version": "3.11", "python_full_version": "3.11.0", "sys_platform": "linux"}
IMAGE_ENV |= {"platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}


def _load_lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scripts_lock", ROOT / "scripts" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


lock_py = _load_lock_module()
LOCKS = {lock.name: lock for lock in lock_py.LOCKS}


def _text(name: str) -> str:
    path = LOCKS[name].path
    assert path.is_file(), f"{path} is missing: {FIX}"
    return path.read_text(encoding="utf-8")


def _pins(name: str) -> dict[str, str]:
    return {canonicalize_name(p.name): p.version for p in lock_py.read_pins(_text(name))}


@pytest.mark.parametrize("name", LOCKS)
def test_lock_is_compiled_from_the_current_requirements(name: str) -> None:
    want = lock_py.inputs(LOCKS[name])
    fingerprint, inputs = lock_py.recorded(_text(name))
    added, removed = sorted(set(want) - set(inputs)), sorted(set(inputs) - set(want))
    why = f"added {added}, removed {removed}" if added or removed else "the recorded fingerprint or target differs"
    assert fingerprint == lock_py.fingerprint(want), (
        f"{LOCKS[name].path.name} drifted from pyproject.toml / the Dockerfile ({why}): {FIX}"
    )


@pytest.mark.parametrize("name", LOCKS)
def test_pins_satisfy_the_requirements(name: str) -> None:
    pins = _pins(name)
    for line in lock_py.inputs(LOCKS[name]):
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(IMAGE_ENV):
            continue
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not in {LOCKS[name].path.name}: {FIX}"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{LOCKS[name].path.name} pins {requirement.name}=={version}, outside {line!r}: {FIX}"
        )


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_is_exact_and_hashed(name: str) -> None:
    pins = lock_py.read_pins(_text(name))
    assert pins, f"{LOCKS[name].path.name} pins nothing: {FIX}"
    names = [canonicalize_name(p.name) for p in pins]
    assert len(names) == len(set(names)), "a package is pinned twice"
    for pin in pins:
        Version(pin.version)  # raises on anything but a version (read_pins already required ==)
        assert pin.hashes, f"{pin.name}=={pin.version} has no --hash: {FIX}"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in pin.hashes), pin


def test_images_agree_on_the_packages_they_share() -> None:
    """The other locks keep the serve lock's pins (compiled with it as a constraint), so the exporter in the trainer
    and the server use the same onnx, numpy, protobuf, grpcio..."""
    serve = _pins("serve")
    for name in ("serve-cuda", "trainer"):
        differ = {p: (v, serve[p]) for p, v in _pins(name).items() if p in serve and serve[p] != v}
        assert not differ, f"{name} and serve pin different versions {differ}: {FIX}"
    assert set(serve) <= set(_pins("serve-cuda"))


def test_cuda_and_torch_builds_are_locked() -> None:
    cuda = set(_pins("serve-cuda")) - set(_pins("serve"))
    assert any(p.startswith("nvidia-cudnn") for p in cuda) and any(p.startswith("nvidia-cublas") for p in cuda)
    trainer = _pins("trainer")
    assert trainer["torch"] == "2.13.0" and "onnxruntime" in trainer and "onnxruntime-gpu" not in trainer
    # torch's CUDA build from PyPI (the production trainer has a GPU): its CUDA wheels are locked with it.
    assert any(p.startswith("nvidia-cudnn") for p in trainer)
    assert "setuptools" in _pins("serve") and "setuptools" in trainer  # the images build the project


def test_a_dependency_edit_changes_the_fingerprint(tmp_path: Path) -> None:
    """What makes the drift test fail after any edit of the dependency lists, before `make lock`."""
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    lock = LOCKS["serve"]
    (tmp_path / "pyproject.toml").write_text(pyproject, encoding="utf-8")
    assert lock_py.inputs(lock, tmp_path) == lock_py.inputs(lock)
    edited = pyproject.replace('"tqdm>=4.66",', '"tqdm>=4.67",', 1)
    assert edited != pyproject
    (tmp_path / "pyproject.toml").write_text(edited, encoding="utf-8")
    assert lock_py.fingerprint(lock_py.inputs(lock, tmp_path)) != lock_py.fingerprint(lock_py.inputs(lock))


def _pip_installs(instructions: list[str]) -> list[str]:
    return [part for line in instructions for part in re.split(r"&&|;", line) if "pip install" in part]


def test_dockerfile_installs_only_from_the_locks() -> None:
    stages = _stages(ROOT / "Dockerfile")
    everything = [line for lines in stages.values() for line in lines]
    for install in _pip_installs(everything):
        project = re.search(r"--no-deps\b.*\s\.$", install.strip())  # the project itself, its dependencies locked
        locked = "--require-hashes" in install and re.search(r"\s-r\s+\S*lock", install)
        assert project or locked, f"an install neither from a lock with --require-hashes nor of the project: {install}"
    for stage, locks in {"serve-build": ("serve", "serve-cuda"), "trainer": ("trainer",)}.items():
        copies = " ".join(line for line in stages[stage] if line.startswith("COPY "))
        runs = " ".join(line for line in stages[stage] if line.startswith("RUN "))
        assert any("--require-hashes" in i for i in _pip_installs(stages[stage])), stage
        for name in locks:
            assert f"deploy/lock/{name}.txt" in copies and f"lock/{name}.txt" in runs, f"{stage} does not use {name}"
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "!deploy/lock/" in ignore, ".dockerignore keeps deploy/lock out of the build context"
