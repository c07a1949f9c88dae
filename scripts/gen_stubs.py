"""Regenerate the committed gRPC stubs in ``textgen/v1/`` from ``proto/``: ``make proto``.

The stubs are committed so that a plain ``pip install`` works without a build step; ``tests/test_proto.py``
regenerates them into a temporary directory and fails when they drift from the committed ones. The generator is
pinned (``grpcio-tools`` in the dev extra) because its output changes between releases."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["textgen/v1/textgen.proto"]


def generate(out_dir: Path) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for every proto under ``out_dir``."""
    from grpc_tools import protoc  # dev dependency, imported only here

    out_dir.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        args = [
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(ROOT / "proto" / proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    return sorted(p for p in out_dir.rglob("*_pb2*") if p.is_file())


if __name__ == "__main__":
    written = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    print("\n".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in written))
