"""Print pyproject.toml's requirements, one a line: the project's dependencies and those of each extra named as an
argument. The Dockerfile installs them from pyproject.toml alone, before it copies the code, so a code edit
reinstalls nothing but the project itself. Runs in the image's Python (3.11: tomllib)."""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"requirements.py: no such extra in {pyproject}: {', '.join(unknown)}")
    return [*project["dependencies"], *(r for e in extras for r in optional[e])]


if __name__ == "__main__":
    print("\n".join(requirements(Path("pyproject.toml"), sys.argv[1:])))
