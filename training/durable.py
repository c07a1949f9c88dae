"""Writes that survive a power cut: a file's data is fsynced before it is renamed into place, and a directory is
fsynced after an entry in it is created or renamed, because on Linux (ext4, xfs) a rename is only durable once
its directory is. Without both, a crash can leave a checkpoint or bundle name pointing at empty or torn data.

A few lines of ``os.fsync`` rather than a library: the ones made for this (``atomicwrites``) are unmaintained,
and the exporter writes whole directories, which they do not cover."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (its directory entry is the caller's to fsync)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def make_directories_durably(path: Path) -> None:
    """``mkdir -p path``, fsyncing the parent of each directory it creates, so the new entries survive a crash."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_directory(directory.parent)
