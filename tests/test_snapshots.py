"""Sealed snapshots and their keyring: the codec and the keyring file on their own (a real model from the tiny
bundle, no server), then through real servers on loopback ports: resuming on another replica, key rotation, and
every fault answered with INVALID_ARGUMENT naming ``snapshot``. Time is an injected clock, never a sleep."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.context import Context
from service.keyring import Keyring, SnapshotKey, fingerprint_id, parse_key, parse_keyring, read_keyring_file
from service.models import ModelRegistry, ServedModel
from service.server import BackgroundServer
from service.settings import load_settings
from service.snapshots import CLOCK_SKEW_SECONDS, FORMAT_VERSION, MAGIC, SALT_BYTES, SnapshotCodec
from textgen.errors import ConfigError, InvalidInputError
from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, MODEL, Live, rpc_error

NOW = 1_750_000_000.0  # the injected clock's "now"
OLD, NEW, OTHER = (SnapshotKey(name, bytes([i]) * 32) for i, name in enumerate(("old", "new", "other"), 1))


def key_line(key: SnapshotKey) -> str:
    return f"{key.id}:{base64.b64encode(key.secret).decode()}"


def codec(*keys: SnapshotKey, now: float = NOW, **kwargs: Any) -> SnapshotCodec:
    return SnapshotCodec(Keyring(keys), clock=lambda: now, **kwargs)


@pytest.fixture(scope="module")
def model(served_bundle: Path) -> ServedModel:
    registry = ModelRegistry.load(
        load_settings(bundle=served_bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
    )
    return registry.get(MODEL)


@pytest.fixture
def ctx(model: ServedModel) -> Context:
    """A context in the middle of a text: non-zero state, a pending token, tokens seen, a generator moved on."""
    rng = np.random.default_rng(5)
    c = Context.fresh(model, seed=123)
    c.state = tuple(rng.standard_normal(s.shape).astype(np.float32) for s in c.state)
    c.pending, c.token_count = model.vocab_size - 1, 77
    c.seen[rng.integers(0, model.vocab_size, 9)] = True
    c.rng.random(3)
    return c


def reseal(sealer: SnapshotCodec, blob: bytes, **changes: Any) -> bytes:
    """``blob`` opened, changed as a key holder could, and sealed again."""
    state = sealer.open(blob)
    for name, value in changes.items():
        if name == "tensors":
            del state.tensors[:]
            state.tensors.extend(value)
        else:
            setattr(state, name, value)
    return sealer.seal(state.SerializeToString())


def refused(load: Callable[[], object]) -> str:
    with pytest.raises(InvalidInputError) as info:
        load()
    message = str(info.value)
    assert message.startswith("snapshot: "), message
    return message


# -- the codec ----------------------------------------------------------------------------------------------


def test_round_trip_restores_every_part_of_the_context(ctx: Context, model: ServedModel) -> None:
    c = codec(OLD)
    back = c.load(c.dump(ctx), model)
    assert all(np.array_equal(a, b) for a, b in zip(back.state, ctx.state, strict=True))
    assert (back.pending, back.token_count, back.seed) == (ctx.pending, ctx.token_count, ctx.seed)
    assert np.array_equal(back.seen, ctx.seen)
    assert np.array_equal(back.rng.random(4), ctx.rng.random(4))  # the generator goes on where it was


def test_the_payload_cannot_be_read(ctx: Context, model: ServedModel) -> None:
    c = codec(OLD)
    blob = c.dump(ctx)
    plaintext = c.open(blob).SerializeToString()
    seen = np.packbits(ctx.seen).tobytes()
    assert plaintext not in blob and seen not in blob
    assert model.name.encode() not in blob and model.tokenizer_sha256.encode() not in blob
    # Not even a 6-byte piece of the plaintext shows through (a readable field would).
    pieces = {plaintext[i : i + 6] for i in range(len(plaintext) - 5)}
    assert not any(blob[i : i + 6] in pieces for i in range(len(MAGIC) + 2 + len(OLD.id) + SALT_BYTES, len(blob) - 5))
    assert c.dump(ctx) != blob  # a fresh salt (so key) each time: equal states do not give equal snapshots
    assert blob.startswith(MAGIC + bytes([FORMAT_VERSION, len(OLD.id)]) + OLD.id.encode())


def test_rotation_opens_snapshots_of_every_key_in_the_ring(ctx: Context, model: ServedModel) -> None:
    sealed_old = codec(OLD).dump(ctx)
    rotated = codec(NEW, OLD)
    assert rotated.load(sealed_old, model).token_count == ctx.token_count
    sealed_new = rotated.dump(ctx)
    assert sealed_new[6 : 6 + len(NEW.id)] == NEW.id.encode()  # the active key seals
    assert codec(NEW).load(sealed_new, model).token_count == ctx.token_count
    message = refused(lambda: codec(NEW).load(sealed_old, model))
    assert "key id 'old'" in message and "retired" in message and "another deployment" in message


def test_every_fault_has_its_own_message(ctx: Context, model: ServedModel) -> None:
    c = codec(OLD)
    blob = c.dump(ctx)
    layers, hidden = model.state_shape
    impostor = codec(SnapshotKey(OLD.id, b"\x09" * 32))  # same id, another key: another deployment
    cases: dict[str, tuple[Callable[[], object], str]] = {
        "garbage": (lambda: c.load(b"\xff" * 40, model), "not a textgen snapshot"),
        "format 1": (
            lambda: c.load(pb.SignedSnapshot(payload=b"x", mac=b"y" * 32).SerializeToString(), model),
            "not a",
        ),
        "magic cut": (lambda: c.load(MAGIC[:2], model), "truncated"),
        "header cut": (lambda: c.load(blob[:20], model), "truncated"),
        "tail cut": (lambda: c.load(blob[:-1], model), "authentication failed"),
        "version": (lambda: c.load(MAGIC + b"\x07" + blob[5:], model), "unknown format version 7"),
        "key id": (lambda: c.load(MAGIC + b"\x02\x00" + blob[6:], model), "malformed header"),
        "unknown key": (lambda: codec(NEW).load(blob, model), "does not hold"),
        "wrong key": (lambda: impostor.load(blob, model), "authentication failed"),
        "expired": (
            lambda: codec(OLD, now=NOW + 8 * 86400).load(blob, model),
            "expired: taken 8.0 days ago, and this server accepts snapshots up to 7.0 days old",
        ),
        "future": (lambda: codec(OLD, now=NOW - 3600).load(blob, model), "in the future"),
        "model": (lambda: c.load(reseal(c, blob, model="another"), model), "belongs to model 'another'"),
        "version of model": (lambda: c.load(reseal(c, blob, model_version="9"), model), "version '9'"),
        "tokenizer": (lambda: c.load(reseal(c, blob, tokenizer_sha256="0" * 64), model), "different tokenizer"),
        "tensor count": (lambda: c.load(reseal(c, blob, tensors=[b"\0" * layers * hidden * 4]), model), "shape"),
        "tensor size": (lambda: c.load(reseal(c, blob, tensors=[b"\0" * 8] * 2), model), "shape"),
        "pending": (lambda: c.load(reseal(c, blob, pending_token=model.vocab_size), model), "pending token"),
        "seen": (lambda: c.load(reseal(c, blob, seen=b"\xff"), model), "seen-token mask"),
        "generator": (lambda: c.load(reseal(c, blob, rng_inc=b"\1"), model), "generator state"),
        "not a state": (lambda: c.load(c.seal(b"\xff\xff\xff"), model), "not a session state"),
        "state version": (lambda: c.load(reseal(c, blob, format_version=1), model), "state format version 1"),
        "no time": (lambda: c.load(reseal(c, blob, created_unix=float("nan")), model), "not a time"),
    }
    for what, (load, expected) in cases.items():
        assert expected in refused(load), what


def test_age_limits_allow_for_clock_skew(ctx: Context, model: ServedModel) -> None:
    blob = codec(OLD).dump(ctx)  # taken at NOW
    limit = 600.0
    assert codec(OLD, now=NOW + limit + CLOCK_SKEW_SECONDS, max_age_seconds=limit).load(blob, model)
    assert "expired" in refused(
        lambda: codec(OLD, now=NOW + limit + CLOCK_SKEW_SECONDS + 1, max_age_seconds=limit).load(blob, model)
    )
    assert codec(OLD, now=NOW - CLOCK_SKEW_SECONDS).load(blob, model)  # a replica whose clock is a minute behind
    assert "future" in refused(lambda: codec(OLD, now=NOW - CLOCK_SKEW_SECONDS - 1).load(blob, model))


def test_any_changed_byte_is_refused(ctx: Context, model: ServedModel) -> None:
    c = codec(OLD)
    blob = c.dump(ctx)
    for i in range(len(blob)):
        for flip in (0x01, 0x80):
            changed = blob[:i] + bytes([blob[i] ^ flip]) + blob[i + 1 :]
            refused(lambda changed=changed: c.load(changed, model))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_input_gives_anything_but_invalid_input(data: st.DataObject, ctx: Context, model: ServedModel) -> None:
    """Random bytes, random bytes behind a valid header, and random payloads sealed by a key holder."""
    c = codec(OLD)
    blob = c.dump(ctx)
    kind = data.draw(st.sampled_from(["bytes", "header", "sealed", "spliced"]))
    if kind == "bytes":
        candidate = data.draw(st.binary(min_size=1, max_size=200))
    elif kind == "header":
        candidate = blob[: data.draw(st.integers(0, 40))] + data.draw(st.binary(max_size=200))
    elif kind == "sealed":
        candidate = c.seal(data.draw(st.binary(max_size=300)))
    else:  # a real state with random field values, sealed
        state = c.open(blob)
        state.pending_token = data.draw(st.integers(-(2**63), 2**63 - 1))
        state.seen = data.draw(st.binary(max_size=64))
        state.rng_state = data.draw(st.binary(max_size=20))
        state.rng_inc = data.draw(st.binary(max_size=20))
        state.created_unix = data.draw(st.floats(allow_nan=True))
        state.token_count = data.draw(st.integers(0, 2**64 - 1))
        candidate = c.seal(state.SerializeToString())
    try:
        assert isinstance(c.load(candidate, model), Context)
    except InvalidInputError as exc:
        assert str(exc).startswith("snapshot: ")


# -- the keyring --------------------------------------------------------------------------------------------


def test_keyring_lines_in_every_accepted_form() -> None:
    secret = os.urandom(32)
    b64, urlsafe, hexed = base64.b64encode(secret).decode(), base64.urlsafe_b64encode(secret).decode(), secret.hex()
    text = f"# rotated 2025-01-01\n\nk2:{b64}\n  k1 : {hexed}  \n{urlsafe.rstrip('=')}\n"
    ring = parse_keyring(text)
    assert [k.id for k in ring.keys] == ["k2", "k1", fingerprint_id(secret)] and ring.active.id == "k2"
    assert all(k.secret == secret for k in ring.keys)
    assert parse_key(b64) != parse_key(base64.b64encode(os.urandom(32)).decode())  # bare keys: distinct ids
    assert len(parse_key(base64.b64encode(os.urandom(64)).decode()).secret) == 64  # longer keys are fine
    assert secret.hex() not in repr(ring)  # secrets stay out of reprs, so out of logs and tracebacks


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "no keys"),
        ("# only a comment\n", "no keys"),
        ("k1:" + base64.b64encode(b"x" * 16).decode(), "line 1: the key is 16 bytes (128 bits)"),
        ("k1:test-key", "line 1: the key is 6 bytes"),
        ("k1:" + "ab" * 40 + "!", "neither hex nor base64"),
        ("k1:", "empty key"),
        ("bad id:" + "ab" * 32, "key id"),
        ("k1:" + "ab" * 32 + "\nk1:" + "cd" * 32, "appears twice"),
        ("k1:" + base64.b64encode(b"x" * 2000).decode(), "not a key"),
    ],
)
def test_malformed_keyrings_say_why(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_keyring(text)
    assert expected in str(info.value)


def test_keyring_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    with pytest.raises(ValueError, match="no such file"):
        read_keyring_file(path)
    path.write_text(key_line(OLD) + "\n")
    path.chmod(0o644)  # readable by others is accepted (container secret mounts look like this)
    assert read_keyring_file(path).active.id == "old"
    path.chmod(0o646)
    with pytest.raises(ValueError, match="writable by every user"):
        read_keyring_file(path)
    path.chmod(0o600)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_keyring_file(path)
    with pytest.raises(ValueError, match="not a regular file"):
        read_keyring_file(tmp_path)


def _settings_error(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(bundle=Path("/nonexistent"), **overrides)
    return str(info.value)


def test_start_up_refuses_bad_keys_naming_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = base64.b64encode(b"k" * 20).decode()
    path = tmp_path / "keys"
    assert _settings_error(snapshot_key_file=path).startswith("snapshot_key_file (TEXTGEN_SNAPSHOT_KEY_FILE): no such")
    path.write_text(f"{key_line(OLD)}\nnew:{short}\n")
    message = _settings_error(snapshot_key_file=path)
    assert message.startswith("snapshot_key_file (TEXTGEN_SNAPSHOT_KEY_FILE): line 2: the key is 20 bytes")
    assert short not in message
    monkeypatch.setenv("TEXTGEN_SNAPSHOT_KEY", short)
    message = _settings_error()
    assert message.startswith("snapshot_key (TEXTGEN_SNAPSHOT_KEY): the key is 20 bytes") and short not in message
    monkeypatch.setenv("TEXTGEN_SNAPSHOT_KEY", key_line(NEW))
    path.write_text(key_line(OLD))
    assert "give one of them" in _settings_error(snapshot_key_file=path)
    keyring = SnapshotCodec.from_settings(load_settings(bundle=Path("/nonexistent"))).keyring
    assert [k.id for k in keyring.keys] == ["new"]


def test_textgen_serve_stops_at_start_up_with_one_line(tmp_path: Path, served_bundle: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("k1:" + "ab" * 8 + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "textgen.cli",
            "serve",
            "--bundle",
            str(served_bundle),
            "--snapshot-key-file",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "snapshot_key_file (TEXTGEN_SNAPSHOT_KEY_FILE): line 1: the key is 8 bytes" in proc.stderr
    assert time.monotonic() - started < 60


def test_no_command_line_flag_takes_a_key() -> None:
    """A flag's value is visible to every user in ``ps``: TEXTGEN_SNAPSHOT_KEY is the environment's alone."""
    from textgen.cli import build_parser

    (commands,) = build_parser()._subparsers._group_actions  # type: ignore[union-attr]
    dests = {action.dest for action in commands.choices["serve"]._actions}
    assert "snapshot_key_file" in dests and "snapshot_key" not in dests


def test_keygen_makes_a_key_the_keyring_accepts(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "textgen.cli", "keygen", "--id", "2025-q1"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    key = parse_key(out.stdout)
    assert key.id == "2025-q1" and len(key.secret) == 32
    second = subprocess.run([sys.executable, "-m", "textgen.cli", "keygen"], capture_output=True, text=True, timeout=60)
    other = parse_key(second.stdout)
    assert other.secret != key.secret and other.id.startswith(time.strftime("%Y", time.gmtime()))


# -- through real servers -----------------------------------------------------------------------------------


@pytest.fixture
def start(served_bundle: Path, tmp_path: Path) -> Iterator[Callable[..., Live]]:
    """Starts servers on the tiny bundle with ``keys`` (a keyring file written for it, or None: no key)."""
    started: list[Live] = []

    def run(*keys: SnapshotKey, **overrides: Any) -> Live:
        extra: dict[str, Any] = {}
        if keys:
            path = tmp_path / f"keys-{len(started)}"
            path.write_text("".join(key_line(k) + "\n" for k in keys))
            path.chmod(stat.S_IRUSR)
            extra["snapshot_key_file"] = path
        settings = load_settings(
            bundle=served_bundle,
            host="127.0.0.1",
            port=0,
            providers=["CPUExecutionProvider"],
            intra_op_threads=1,
            log_level="error",
            **extra,
            **overrides,
        )
        started.append(Live(BackgroundServer(settings)))
        return started[-1]

    yield run
    for live in reversed(started):
        live.close()


def _invalid(server: Live, blob: bytes) -> str:
    """The details of INVALID_ARGUMENT that both ways of resuming a snapshot give for ``blob``."""
    details = set()
    for err in (
        rpc_error(server.generate, "a", snapshot=blob, max_tokens=2),
        rpc_error(server.stub.CreateSession, pb.CreateSessionRequest(snapshot=blob), timeout=CALL_TIMEOUT),
    ):
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        details.add(err.details())
    (message,) = details
    assert message.startswith("snapshot: ")
    return message


def test_replicas_sharing_a_keyring_resume_each_others_snapshots(start: Callable[..., Live]) -> None:
    first, second = start(OLD), start(OLD)
    head = first.generate("the ", max_tokens=12, temperature=0.8, seed=4, return_snapshot=True)
    snapshot = head.complete.snapshot
    assert snapshot.startswith(MAGIC) and len(snapshot) < 4096
    later = dict(prompt=" a", max_tokens=20, temperature=0.8, repetition_penalty=1.2)
    assert second.generate(snapshot=snapshot, **later).text == first.generate(snapshot=snapshot, **later).text


def test_rotation_across_a_redeploy(start: Callable[..., Live]) -> None:
    before = start(OLD)
    snapshot = before.generate("to be", max_tokens=8, seed=2, return_snapshot=True).complete.snapshot
    later = dict(prompt=" or", max_tokens=10, temperature=0.7)
    expected = before.generate(snapshot=snapshot, **later).text
    rotated = start(NEW, OLD)  # the new key seals, the old one still opens
    reply = rotated.generate(snapshot=snapshot, return_snapshot=True, **later)
    assert reply.text == expected
    assert reply.complete.snapshot[6 : 6 + len(NEW.id)] == NEW.id.encode()
    retired = start(NEW)  # the old key removed
    assert "key id 'old'" in _invalid(retired, snapshot) and "retired" in _invalid(retired, snapshot)
    assert retired.generate(snapshot=reply.complete.snapshot, max_tokens=2).complete.generated_tokens == 2


def test_faults_through_the_server(start: Callable[..., Live]) -> None:
    live = start(OLD, snapshot_max_age_seconds=60)
    snapshot = live.generate("the ", max_tokens=5, seed=1, return_snapshot=True).complete.snapshot
    middle = len(snapshot) // 2
    assert "authentication failed" in _invalid(
        live, snapshot[:middle] + bytes([snapshot[middle] ^ 1]) + snapshot[middle + 1 :]
    )
    assert "authentication failed" in _invalid(live, snapshot[:-10])
    assert "not a textgen snapshot" in _invalid(live, os.urandom(64))
    # Sealed with the same keyring by a replica whose clock says an hour ago, or an hour ahead.
    assert "expired: taken 60.0 min ago" in _invalid(live, codec(OLD, now=time.time() - 3600).dump(_ctx_of(live)))
    assert "in the future" in _invalid(live, codec(OLD, now=time.time() + 3600).dump(_ctx_of(live)))
    assert "does not hold" in _invalid(live, codec(OTHER).dump(_ctx_of(live)))
    assert live.generate("a", snapshot=snapshot, max_tokens=2).complete.generated_tokens == 2


def _ctx_of(live: Live) -> Context:
    return Context.fresh(live.server.app.registry.get(MODEL), seed=1)


def test_without_a_key_snapshots_open_only_on_their_own_process(start: Callable[..., Live]) -> None:
    one, two = start(), start()
    assert one.server.app.snapshots.ephemeral_key
    snapshot = one.generate("a", max_tokens=3, seed=1, return_snapshot=True).complete.snapshot
    assert one.generate(snapshot=snapshot, max_tokens=2).complete.generated_tokens == 2
    assert "does not hold" in _invalid(two, snapshot)
