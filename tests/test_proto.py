"""The committed gRPC stubs must be exactly what the pinned generator makes from proto/ (`make proto`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    spec = importlib.util.spec_from_file_location("gen_stubs", ROOT / "scripts" / "gen_stubs.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "the generator wrote nothing"
    for path in fresh:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is not committed: run `make proto`"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} drifted from proto/: run `make proto`"


def test_proto_follows_the_api_conventions() -> None:
    from textgen.v1 import textgen_pb2 as pb

    assert pb.DESCRIPTOR.package == "textgen.v1"
    service = pb.DESCRIPTOR.services_by_name["TextGeneration"]
    assert service.methods_by_name["GenerateStream"].server_streaming
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED")
