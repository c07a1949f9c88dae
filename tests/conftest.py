from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from live_server import Live

# One torch thread for the tiny models the tests train (here and in the `textgen` subprocesses they start, which
# inherit the environment): two OpenMP threads buy nothing at this size, and beside another busy process they spin
# against it (60 steps took 6.7 s instead of 1.9 s with a CPU hog running), which no test may depend on.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A small corpus with enough structure to learn quickly and enough lines for word-level work.
_LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "def add(a, b):",
    "    return a + b",
    "to be or not to be that is the question",
]


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return "\n".join(_LINES * 60) + "\n"


@pytest.fixture
def corpus_file(tmp_path: Path, corpus_text: str) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


def _train_tiny(tmp_path_factory: pytest.TempPathFactory, corpus_text: str, name: str, steps: int) -> Path:
    """A 48-unit char LSTM trained for ``steps`` on ``corpus_text``; returns its run directory."""
    from training.run import run_train

    root = tmp_path_factory.mktemp(name)
    data = root / "corpus.txt"
    data.write_text(corpus_text, encoding="utf-8")
    run_train(
        {"hidden_size": 48, "embedding_size": 16},
        {"path": str(data)},
        {"batch_size": 4, "bptt": 32, "max_steps": steps, "eval_every": steps // 2, "lr": 1e-2},
        root / "run",
        progress=False,
    )
    return root / "run"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """A tiny char model trained once for the tests that need a checkpoint."""
    return _train_tiny(tmp_path_factory, corpus_text, "trained", 40)


@pytest.fixture(scope="session")
def fluent_run(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """Like ``trained_run`` but trained long enough (about a second) that greedy decoding reproduces corpus lines
    instead of repeating one character, so tests of greedy output, stop strings and sessions are not vacuous."""
    return _train_tiny(tmp_path_factory, corpus_text, "fluent", 300)


@pytest.fixture(scope="session")
def served_bundle(tmp_path_factory: pytest.TempPathFactory, fluent_run: Path) -> Path:
    """The ``fluent_run`` checkpoint exported once as an fp32 bundle named ``tiny``, version ``1``."""
    from exporter.publish import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny" / "1"
    export_bundle(fluent_run / "best.pt", out)
    return out


@pytest.fixture
def serve(served_bundle: Path) -> Iterator[Callable[..., Live]]:
    """Start a real server on the ``served_bundle`` with settings overrides; each is stopped after the test."""
    from live_server import start_server

    started: list[Live] = []

    def start(**overrides: Any) -> Live:
        started.append(start_server(served_bundle, **overrides))
        return started[-1]

    yield start
    for live in reversed(started):
        live.close()


@pytest.fixture
def durability_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The real ``os.fsync``, ``os.rename`` and ``os.replace`` calls made during the test, in order:
    ``("fsync", path synced)``, ``("rename", source)``, ``("replace", destination)``."""
    events: list[tuple[str, str]] = []
    real = {name: getattr(os, name) for name in ("fsync", "rename", "replace")}

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real["fsync"](fd)

    def rename(src: str | Path, dst: str | Path) -> None:
        events.append(("rename", str(src)))
        real["rename"](src, dst)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", str(dst)))
        real["replace"](src, dst)

    for name, fn in (("fsync", fsync), ("rename", rename), ("replace", replace)):
        monkeypatch.setattr(os, name, fn)
    return events
