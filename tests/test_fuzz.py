"""Property-based fuzzing of every TextGeneration RPC against a real server: any request message, with random
unicode prompts and stops, random bytes as snapshots, extreme numbers, real and unknown names, is answered OK or
with a documented status whose message names the field at fault; never INTERNAL or UNKNOWN, and the server stays
healthy and serving afterwards.

The example count is bounded for CI (``TEXTGEN_FUZZ_EXAMPLES``, default 150 per RPC); a longer run is the same test
with a larger count (``TEXTGEN_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``)."""

from __future__ import annotations

import os
import re
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, Live, wait_until

EXAMPLES = int(os.environ.get("TEXTGEN_FUZZ_EXAMPLES", "150"))
# Statuses a well-formed but unacceptable request may get (README, "Errors"); INTERNAL and UNKNOWN mean a bug.
DOCUMENTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
RPCS = [
    "Generate",
    "GenerateStream",
    "Score",
    "ListModels",
    "GetModel",
    "CreateSession",
    "ForkSession",
    "CloseSession",
    "Predict",
]
_INT_RANGE = {FieldDescriptor.TYPE_UINT32: 2**32 - 1, FieldDescriptor.TYPE_UINT64: 2**64 - 1}

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)  # protobuf strings are valid UTF-8
_numbers = st.one_of(
    st.floats(width=32),  # NaN, infinities, subnormals, huge values
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 1e-45, 100.0, 100.5]),
)


def _strategy(field: FieldDescriptor, names: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    if field.name in names:
        return names[field.name]
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:  # map<K, V> (logit_bias)
        entry = field.message_type.fields_by_name
        return st.dictionaries(_strategy(entry["key"], names), _strategy(entry["value"], names), max_size=20)
    if kind in _INT_RANGE:
        top = _INT_RANGE[kind]
        one = st.one_of(st.integers(0, 64), st.integers(0, top), st.sampled_from([top, top - 1, 2**31]))
    elif kind == FieldDescriptor.TYPE_FLOAT:
        one = _numbers
    elif kind == FieldDescriptor.TYPE_BOOL:
        one = st.booleans()
    elif kind == FieldDescriptor.TYPE_ENUM:  # an open enum: its values, and numbers it does not name
        one = st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-(2**31), 2**31 - 1)
    elif kind == FieldDescriptor.TYPE_BYTES:
        one = st.binary(max_size=600)
    elif kind == FieldDescriptor.TYPE_MESSAGE:  # e.g. GenerateRequest.resume
        one = _message(field.message_type, names)
    else:
        one = _text
    return st.lists(one, max_size=20) if field.is_repeated else one


def _message(desc: Descriptor, names: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Request messages of ``desc``'s type with any subset of fields set to any value of their type."""
    cls = getattr(pb, desc.name)
    fields = {f.name: st.none() | _strategy(f, names) for f in desc.fields}
    return st.fixed_dictionaries(fields).map(lambda values: cls(**{k: v for k, v in values.items() if v is not None}))


def _names_a_field(details: str, desc: Descriptor) -> bool:
    first = re.split(r"[:\s,\[.]", details, maxsplit=1)[0]  # "resume.token_ids[3]: ..." names resume
    return first in {f.name for f in desc.fields} | {"x-textgen-principal"}


@pytest.fixture(scope="module")
def fuzzed(served_bundle: Any) -> Any:
    from live_server import start_server

    # Small limits, so that accepted requests stay cheap and the limits themselves are fuzzed.
    live = start_server(served_bundle, max_tokens_limit=24, default_max_tokens=8, max_prompt_tokens=256)
    yield live
    live.close()


@pytest.mark.parametrize("rpc", RPCS)
def test_every_answer_is_ok_or_a_documented_status_naming_the_field(fuzzed: Live, rpc: str) -> None:
    live = fuzzed
    method = live.stub.__getattribute__(rpc)
    desc = pb.DESCRIPTOR.services_by_name["TextGeneration"].methods_by_name[rpc].input_type
    sessions = [live.stub.CreateSession(pb.CreateSessionRequest(seed=i), timeout=CALL_TIMEOUT) for i in range(3)]
    snapshot = live.generate("the ", max_tokens=2, return_snapshot=True).complete.snapshot
    tampered = snapshot[:-1] + bytes([snapshot[-1] ^ 1])
    names = {
        "model": st.sampled_from(["", "tiny", "other", "tiny ", "\x00"]) | _text,
        "session_id": st.sampled_from(["", *(s.session_id for s in sessions), "s_unknown"]) | _text,
        "snapshot": st.sampled_from([b"", snapshot, tampered, snapshot[:40]]) | st.binary(max_size=600),
        "prompt": st.sampled_from(["", "the ", "a" * 300]) | _text,
        "text": st.sampled_from(["", "the ", " ", "a" * 300]) | _text,
    }
    seen: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_message(desc, names))
    def check(request: Any) -> None:
        try:
            reply = method(request, timeout=CALL_TIMEOUT)
            if rpc == "GenerateStream":
                assert list(reply)[-1].HasField("complete")
            seen["OK"] = seen.get("OK", 0) + 1
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
            seen[code.name] = seen.get(code.name, 0) + 1
            assert code in DOCUMENTED, f"{code.name}: {details} for {request}"
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert _names_a_field(details, desc), f"no field named in {details!r}"

    check()
    print(rpc, seen)  # shown with pytest -s
    assert live.check("") == 1  # still SERVING
    wait_until(lambda: live.engine.idle, "the engine idle again")
    assert live.generate("the ", max_tokens=3).complete.generated_tokens == 3


def test_fuzzed_rpc_list_is_the_whole_service() -> None:
    assert sorted(RPCS) == sorted(m.name for m in pb.DESCRIPTOR.services_by_name["TextGeneration"].methods)


@pytest.mark.parametrize("rpc", RPCS)
def test_raw_bytes_are_answered_like_any_request(fuzzed: Live, rpc: str) -> None:
    """Bytes that are not a valid message (invalid UTF-8 in a string, truncated fields) get INVALID_ARGUMENT
    naming the request, or parse and get what the message they parse as gets; never UNKNOWN from inside gRPC."""
    method = pb.DESCRIPTOR.services_by_name["TextGeneration"].methods_by_name[rpc]
    path = f"/{method.containing_service.full_name}/{rpc}"
    kind = fuzzed.channel.unary_stream if method.server_streaming else fuzzed.channel.unary_unary
    call = kind(path, request_serializer=None, response_deserializer=None)
    invalid_utf8 = pb.GenerateRequest(prompt="x").SerializeToString().replace(b"x", b"\xff")

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=300), st.just(invalid_utf8), st.just(b"\x0a\x05ab")))
    def check(data: bytes) -> None:
        try:
            reply = call(data, timeout=CALL_TIMEOUT)
            if method.server_streaming:
                list(reply)
        except grpc.RpcError as err:
            assert err.code() in DOCUMENTED, f"{err.code().name}: {err.details()} for {data!r}"
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                first = re.split(r"[:\s,\[]", err.details() or "", maxsplit=1)[0]
                assert first == "request" or _names_a_field(err.details() or "", method.input_type), err.details()

    check()
    assert fuzzed.check("") == 1
