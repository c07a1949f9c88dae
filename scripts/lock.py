"""The images' lock files, deploy/lock/*.txt: every package each Docker image installs, pinned, with the sha256 of
each of its files, so that every build (and every replica) runs the same bits. `make lock` runs this after an edit
of the dependencies in pyproject.toml (or of the Dockerfile's CUDA_LIBS or TORCH default); tests/test_lock.py fails
until then. Resolved by uv against PyPI alone (never a machine's extra indexes or local wheels) for the images'
CPython 3.11 on x86_64 Linux, keeping the existing pins unless --upgrade is given.

Each lock starts with the requirements it was compiled from and their fingerprint, which the test recomputes from
pyproject.toml and the Dockerfile. Standard library only, so it runs in any Python 3.11."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = ROOT / "deploy" / "lock"
PYTHON_VERSION = "3.11"  # the images' python:3.11-slim
# glibc 2.31: llguidance's wheels need it (torch's need 2.28); the slim images' Debian (glibc 2.36) runs both.
PLATFORM = "x86_64-manylinux_2_31"
INDEX = "https://pypi.org/simple"
TARGET = f"CPython {PYTHON_VERSION}, {PLATFORM}, {INDEX}"
COMMAND = "make lock"


@dataclass(frozen=True)
class Lock:
    name: str
    purpose: str
    extras: tuple[str, ...]
    # Dockerfile ARGs whose default value is a requirement of this image (what the build installs unless overridden).
    args: tuple[str, ...] = ()
    # A lock whose pins this one keeps, so the images agree on every package they share.
    base: str | None = None

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"


LOCKS = (
    Lock("serve", 'the serve image built with CUDA_LIBS="" (CPU only; what CI builds)', ("serve", "gpu")),
    Lock(
        "serve-cuda", "the serve image with its default CUDA_LIBS", ("serve", "gpu"), args=("CUDA_LIBS",), base="serve"
    ),
    # torch from PyPI is its CUDA build for Linux, with the nvidia-* wheels: the production trainer has a GPU.
    Lock("trainer", "the trainer image (torch's CUDA build)", ("train", "serve", "cpu"), args=("TORCH",), base="serve"),
)
BY_NAME = {lock.name: lock for lock in LOCKS}


def requirements(pyproject: Path, extras: tuple[str, ...]) -> list[str]:
    """The project's dependencies and those of each extra named."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"lock.py: no such extra in {pyproject}: {', '.join(unknown)}")
    return [*project["dependencies"], *(r for e in extras for r in optional[e])]


def extra_requirements(lock: Lock, root: Path = ROOT) -> list[str]:
    """What the image installs beyond the project's requirements: the build requirements (the image builds the
    project) and the defaults of the Dockerfile ARGs the lock covers."""
    build = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
    return [*build, *(dockerfile_arg(root / "Dockerfile", arg) for arg in lock.args)]


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    """The default value of ``ARG name=...`` in the Dockerfile."""
    found = re.findall(rf'^ARG\s+{name}="?([^"\n]*)"?\s*$', dockerfile.read_text(encoding="utf-8"), re.MULTILINE)
    if len(found) != 1:
        raise SystemExit(f"lock.py: expected one `ARG {name}=...` in {dockerfile}, found {len(found)}")
    return found[0]


def inputs(lock: Lock, root: Path = ROOT) -> list[str]:
    """What the lock is compiled from, sorted and without duplicates."""
    lines = requirements(root / "pyproject.toml", lock.extras) + extra_requirements(lock, root)
    return sorted({line.strip() for line in lines if line.strip()})


def fingerprint(lines: list[str]) -> str:
    return hashlib.sha256("\n".join([*lines, TARGET]).encode()).hexdigest()


def header(lock: Lock, lines: list[str]) -> str:
    return "".join(
        [
            f"# The lock of {lock.purpose}.\n",
            f"# Never edit it: `{COMMAND}` (scripts/lock.py) makes it; tests/test_lock.py fails while it drifts.\n",
            f"# target: {TARGET}\n",
            f"# inputs-sha256: {fingerprint(lines)}\n",
            *(f"# input: {line}\n" for line in lines),
        ]
    )


@dataclass(frozen=True)
class Pin:
    name: str  # as written in the lock (uv writes names normalized)
    version: str
    hashes: tuple[str, ...]


def read_pins(text: str) -> list[Pin]:
    """The ``name==version --hash=...`` entries of a lock (continuation lines joined, comments dropped)."""
    pins = []
    for entry in re.sub(r"\\\n", " ", text).splitlines():
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        requirement, *options = entry.split()
        name, sep, version = requirement.partition("==")
        if not sep:
            raise ValueError(f"not pinned with ==: {requirement}")
        hashes = tuple(o.removeprefix("--hash=") for o in options if o.startswith("--hash="))
        pins.append(Pin(name, version, hashes))
    return pins


def recorded(text: str) -> tuple[str | None, list[str]]:
    """The fingerprint and the inputs a lock's header records."""
    found = re.search(r"^# inputs-sha256: ([0-9a-f]{64})$", text, re.MULTILINE)
    return (found.group(1) if found else None), re.findall(r"^# input: (.+)$", text, re.MULTILINE)


def _uv_env() -> dict[str, str]:
    # A user's UV_INDEX_URL, UV_FIND_LINKS or UV_CONSTRAINT must not reach the lock; its cache may.
    return {k: v for k, v in os.environ.items() if not k.startswith("UV_") or k == "UV_CACHE_DIR"}


def compile_lock(lock: Lock, uv: str, upgrade: bool) -> None:
    lines = inputs(lock)
    output = lock.path.relative_to(ROOT)
    # Relative paths (run from the repository root), so the annotations read the same on every machine.
    command = [uv, "pip", "compile", "--no-config", "--quiet", "--index-url", INDEX, "--generate-hashes"]
    command += ["--only-binary", ":all:", "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM]
    command += ["--custom-compile-command", COMMAND, "pyproject.toml", *(f"--extra={e}" for e in lock.extras)]
    command += ["-", "--output-file", str(output)]
    if lock.base:
        command += ["--constraint", str(BY_NAME[lock.base].path.relative_to(ROOT))]
    if upgrade:
        command.append("--upgrade")
    stdin = "\n".join(extra_requirements(lock)) + "\n"
    subprocess.run(command, input=stdin, text=True, check=True, cwd=ROOT, env=_uv_env())
    lock.path.write_text(header(lock, lines) + lock.path.read_text(encoding="utf-8"), encoding="utf-8")
    pins = read_pins(lock.path.read_text(encoding="utf-8"))
    print(f"{output}: {len(pins)} packages, {sum(len(p.hashes) for p in pins)} hashes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("locks", nargs="*", metavar="LOCK", help=f"any of {', '.join(BY_NAME)} (default: all)")
    parser.add_argument("--uv", default="uv", help="the uv executable")
    parser.add_argument("--upgrade", action="store_true", help="newest releases instead of the existing pins")
    args = parser.parse_args(argv)
    unknown = set(args.locks) - set(BY_NAME)
    if unknown:
        parser.error(f"no such lock: {', '.join(sorted(unknown))}")
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for lock in LOCKS:  # in order: a base before the locks that keep its pins
        if not args.locks or lock.name in args.locks:
            compile_lock(lock, args.uv, args.upgrade)


if __name__ == "__main__":
    main(sys.argv[1:])
