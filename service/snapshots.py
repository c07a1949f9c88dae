"""Sealed, versioned state snapshots: a session's whole context in a few KB that any replica holding the same model
and keyring can resume, so sessions need no sticky routing and survive redeploys. The client holds the snapshot
but cannot read it (the seen-token bitmap lists every word the user typed) nor change it, and it expires.

Wire format (version 2; version 1 was a readable HMAC-signed protobuf)::

    offset  size  field
    0       4     magic b"TGSS"
    4       1     format version (2)
    5       1     key id length n (1..64)
    6       n     key id (ASCII: A-Z a-z 0-9 . _ -)
    6+n     16    salt (random)
    22+n    ...   AES-256-GCM ciphertext of a SessionState protobuf, then the 16-byte tag

The header (bytes 0 to 22+n) is the associated data: the version and key id are authenticated with the payload,
so neither can be swapped. Each snapshot is sealed under its own AES-256 key, HKDF-SHA256 of the keyring's secret
with the header's random salt (the construction ``age`` uses for its payload key): no key ever seals two
snapshots, so the GCM nonce can be fixed and a keyring key has no limit on how many snapshots it seals. Plain GCM
under one key with random 96-bit nonces must stop at 2^32 messages (NIST SP 800-38D), which a deployment sealing
1,000 snapshots a second reaches in 50 days.

The creation time is inside the sealed payload; a snapshot older than the maximum age, or from further in the
future than the clock-skew allowance, is refused. After opening, the payload is bound to the model's name,
version and tokenizer hash, and every tensor's size is checked against the model. Any bytes at all give a
``Context`` or an ``InvalidInputError`` naming ``snapshot``, never anything else."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import DecodeError

from service.context import Context
from service.keyring import Keyring, load_keyring, valid_key_id
from service.models import ServedModel
from textgen.errors import InvalidInputError
from textgen.v1 import textgen_pb2 as pb

if TYPE_CHECKING:
    from service.settings import ServerSettings

MAGIC = b"TGSS"
FORMAT_VERSION = 2
SALT_BYTES = 16
_NONCE = bytes(12)  # each derived key seals one snapshot only, so a fixed nonce never repeats under a key
TAG_BYTES = 16
DEFAULT_MAX_AGE_SECONDS = 7 * 86400.0
# Replicas' clocks differ by milliseconds under NTP; a minute covers a replica whose clock drifted without refusing
# snapshots for ordinary reasons, and is nothing next to the maximum age.
CLOCK_SKEW_SECONDS = 60.0
_HKDF_INFO = b"textgen.v1 snapshot AES-256-GCM key"
_MIN_BYTES = len(MAGIC) + 2 + 1 + SALT_BYTES + TAG_BYTES
_MASK64 = (1 << 64) - 1


def _cipher(secret: bytes, salt: bytes) -> AESGCM:
    """The AES-256-GCM cipher of one snapshot: its own key, from the keyring secret and the snapshot's salt (a
    configured secret is never a cipher key itself, and one longer than 256 bits counts whole)."""
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_HKDF_INFO).derive(secret))


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _int128_bytes(value: int) -> bytes:
    return value.to_bytes(16, "little")


class SnapshotCodec:
    def __init__(
        self,
        keyring: Keyring | None = None,
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        *,
        clock: Callable[[], float] = time.time,
        skew_seconds: float = CLOCK_SKEW_SECONDS,
    ) -> None:
        # Without a configured key, snapshots open only on this process (still sealed, still exact).
        self.ephemeral_key = keyring is None
        self.keyring = Keyring.ephemeral() if keyring is None else keyring
        self.max_age_seconds = max_age_seconds
        self.skew_seconds = skew_seconds
        self._clock = clock  # injectable so tests can age a snapshot without waiting

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> SnapshotCodec:
        """The codec for the configured keyring (a random key when none is) and maximum age."""
        return cls(load_keyring(settings), settings.snapshot_max_age_seconds)

    # -- sealing -------------------------------------------------------------------------------------------

    def seal(self, payload: bytes) -> bytes:
        """``payload`` (a serialised ``SessionState``) sealed under the active key."""
        key = self.keyring.active
        salt = os.urandom(SALT_BYTES)
        header = MAGIC + bytes([FORMAT_VERSION, len(key.id)]) + key.id.encode("ascii") + salt
        return header + _cipher(key.secret, salt).encrypt(_NONCE, payload, header)

    def dump(self, ctx: Context) -> bytes:
        model = ctx.model
        rng = ctx.rng.bit_generator.state
        state = pb.SessionState(
            format_version=FORMAT_VERSION,
            model=model.name,
            model_version=model.version,
            tokenizer_sha256=model.tokenizer_sha256,
            tensors=[np.ascontiguousarray(s[:, 0, :], dtype="<f4").tobytes() for s in ctx.state],
            pending_token=ctx.pending,
            token_count=ctx.token_count,
            rng_state=_int128_bytes(rng["state"]["state"]),
            rng_inc=_int128_bytes(rng["state"]["inc"]),
            rng_has_uint32=bool(rng["has_uint32"]),
            rng_uinteger=rng["uinteger"],
            seed=ctx.seed & _MASK64,
            seen=np.packbits(ctx.seen).tobytes(),
            created_unix=self._clock(),
        )
        return self.seal(state.SerializeToString())

    # -- opening -------------------------------------------------------------------------------------------

    def open(self, blob: bytes) -> pb.SessionState:
        """The authentic, unexpired ``SessionState`` sealed in ``blob``, not yet checked against any model."""
        if blob[: len(MAGIC)] != MAGIC:
            if len(blob) < len(MAGIC) and MAGIC.startswith(blob):
                raise InvalidInputError(f"snapshot: truncated ({len(blob)} bytes)")
            raise InvalidInputError(
                "snapshot: not a textgen snapshot (no snapshot header; the readable snapshots of format 1 are no "
                "longer accepted)"
            )
        if len(blob) <= len(MAGIC):
            raise InvalidInputError(f"snapshot: truncated ({len(blob)} bytes)")
        version = blob[len(MAGIC)]
        if version != FORMAT_VERSION:
            raise InvalidInputError(
                f"snapshot: unknown format version {version} (this server reads version {FORMAT_VERSION})"
            )
        if len(blob) < _MIN_BYTES:
            raise InvalidInputError(f"snapshot: truncated ({len(blob)} bytes)")
        id_len = blob[len(MAGIC) + 1]
        id_end = len(MAGIC) + 2 + id_len
        header_end = id_end + SALT_BYTES
        if len(blob) < header_end + TAG_BYTES:
            raise InvalidInputError(f"snapshot: truncated ({len(blob)} bytes)")
        key_id = blob[len(MAGIC) + 2 : id_end].decode("ascii", errors="replace")
        if not valid_key_id(key_id):
            raise InvalidInputError("snapshot: malformed header (the key id is not a key id)")
        key = self.keyring.find(key_id)
        if key is None:
            raise InvalidInputError(
                f"snapshot: sealed with key id {key_id!r}, which this server does not hold: the key was retired, "
                "or the snapshot comes from another deployment"
            )
        header = blob[:header_end]
        try:
            payload = _cipher(key.secret, blob[id_end:header_end]).decrypt(_NONCE, blob[header_end:], header)
        except InvalidTag:
            raise InvalidInputError(
                "snapshot: authentication failed: the snapshot was altered or truncated, or sealed with a different "
                f"key under the id {key_id!r}"
            ) from None
        try:
            state = pb.SessionState.FromString(payload)
        except DecodeError:
            raise InvalidInputError("snapshot: the sealed state is not a session state") from None
        if state.format_version != FORMAT_VERSION:
            raise InvalidInputError(f"snapshot: unknown state format version {state.format_version}")
        self._check_age(state.created_unix)
        return state

    def _check_age(self, created: float) -> None:
        if not math.isfinite(created):
            raise InvalidInputError("snapshot: the creation time is not a time")
        now = self._clock()
        if created - now > self.skew_seconds:
            raise InvalidInputError(
                f"snapshot: taken {_duration(created - now)} in the future by this server's clock, more than the "
                f"allowed clock skew of {_duration(self.skew_seconds)}"
            )
        age = now - created
        if age > self.max_age_seconds + self.skew_seconds:
            raise InvalidInputError(
                f"snapshot: expired: taken {_duration(age)} ago, and this server accepts snapshots up to "
                f"{_duration(self.max_age_seconds)} old"
            )

    def load(self, blob: bytes, model: ServedModel) -> Context:
        """The context in ``blob`` for ``model``; ``InvalidInputError`` (field ``snapshot``) for anything that is
        not an intact, unexpired snapshot sealed under a key of this keyring for this exact model."""
        return restore(self.open(blob), model)


def restore(state: pb.SessionState, model: ServedModel) -> Context:
    """``state`` as a context of ``model``, after checking it belongs to that model and fits its shapes."""
    theirs = (state.model, state.model_version, state.tokenizer_sha256)
    ours = (model.name, model.version, model.tokenizer_sha256)
    if theirs != ours:
        raise InvalidInputError(
            f"snapshot: belongs to model {state.model!r} version {state.model_version!r}, "
            f"not {model.name} version {model.version}"
            if theirs[:2] != ours[:2]
            else f"snapshot: model {model.name} version {model.version} has a different tokenizer here"
        )
    layers, hidden = model.state_shape
    if len(state.tensors) != len(model.state_names) or any(len(t) != layers * hidden * 4 for t in state.tensors):
        raise InvalidInputError(
            f"snapshot: state tensors do not match the model's shape ({len(model.state_names)} tensors of "
            f"{layers} x {hidden} float32)"
        )
    if not (-1 <= state.pending_token < model.vocab_size):
        raise InvalidInputError(
            f"snapshot: pending token {state.pending_token} is outside the model's vocabulary of {model.vocab_size}"
        )
    if len(state.seen) != (model.vocab_size + 7) // 8:
        raise InvalidInputError("snapshot: the seen-token mask does not match the model's vocabulary")
    if len(state.rng_state) != 16 or len(state.rng_inc) != 16:
        raise InvalidInputError("snapshot: the sampler's generator state is malformed")
    tensors = tuple(np.frombuffer(t, dtype="<f4").astype(np.float32).reshape(layers, 1, hidden) for t in state.tensors)
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": int.from_bytes(state.rng_state, "little"), "inc": int.from_bytes(state.rng_inc, "little")},
        "has_uint32": int(state.rng_has_uint32),
        "uinteger": state.rng_uinteger,
    }
    seen = np.unpackbits(np.frombuffer(state.seen, np.uint8), count=model.vocab_size).astype(bool)
    return Context(model, tensors, int(state.pending_token), int(state.token_count), rng, int(state.seed), seen)
