"""Signed, versioned state snapshots: a session's whole context in a few KB that any replica holding the same
model and key can resume, so sessions need no sticky routing and survive redeploys.

Wire format: a ``SignedSnapshot`` protobuf (``payload`` = serialised ``SessionState``, ``mac`` = HMAC-SHA256 over
a domain tag and the payload). The MAC is checked before anything in the payload is believed; the payload is then
bound to the model's name, version and tokenizer hash, and every tensor's size is checked against the model."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

import numpy as np
from google.protobuf.message import DecodeError

from service.context import Context
from service.models import ServedModel
from textgen.errors import InvalidInputError
from textgen.v1 import textgen_pb2 as pb

FORMAT_VERSION = 1
_TAG = b"textgen.v1.snapshot"
_MASK64 = (1 << 64) - 1


def _int128_bytes(value: int) -> bytes:
    return value.to_bytes(16, "little")


class SnapshotCodec:
    def __init__(self, key: bytes | None = None) -> None:
        # Without a configured key, snapshots are valid only on this process (still signed, still exact).
        self._key = key if key else secrets.token_bytes(32)
        self.ephemeral_key = not key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, _TAG + payload, hashlib.sha256).digest()

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
            created_unix=time.time(),
        )
        payload = state.SerializeToString()
        return pb.SignedSnapshot(payload=payload, mac=self._mac(payload)).SerializeToString()

    def load(self, blob: bytes, model: ServedModel) -> Context:
        """The context in ``blob`` for ``model``; ``InvalidInputError`` (field ``snapshot``) for anything that is
        not an intact snapshot signed with this key for this exact model."""
        try:
            signed = pb.SignedSnapshot.FromString(blob)
        except DecodeError:
            raise InvalidInputError("snapshot: not a textgen snapshot (truncated or corrupted)") from None
        if len(signed.mac) != 32 or not hmac.compare_digest(signed.mac, self._mac(signed.payload)):
            raise InvalidInputError(
                "snapshot: signature does not match (tampered, truncated, or signed with another server key)"
            )
        state = pb.SessionState.FromString(signed.payload)
        if state.format_version != FORMAT_VERSION:
            raise InvalidInputError(f"snapshot: unknown format version {state.format_version}")
        theirs = (state.model, state.model_version, state.tokenizer_sha256)
        ours = (model.name, model.version, model.tokenizer_sha256)
        if theirs != ours:
            raise InvalidInputError(
                f"snapshot: belongs to model {state.model} version {state.model_version}, "
                f"not {model.name} version {model.version}"
                if theirs[:2] != ours[:2]
                else f"snapshot: model {model.name} version {model.version} has a different tokenizer here"
            )
        layers, hidden = model.state_shape
        if len(state.tensors) != len(model.state_names) or any(len(t) != layers * hidden * 4 for t in state.tensors):
            raise InvalidInputError("snapshot: state tensors do not match the model's shape")
        if not (-1 <= state.pending_token < model.vocab_size):
            raise InvalidInputError("snapshot: pending token out of the vocabulary")
        tensors = tuple(
            np.frombuffer(t, dtype="<f4").astype(np.float32).reshape(layers, 1, hidden) for t in state.tensors
        )
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {
                "state": int.from_bytes(state.rng_state, "little"),
                "inc": int.from_bytes(state.rng_inc, "little"),
            },
            "has_uint32": int(state.rng_has_uint32),
            "uinteger": state.rng_uinteger,
        }
        seen = np.unpackbits(np.frombuffer(state.seen, np.uint8), count=model.vocab_size).astype(bool)
        return Context(model, tensors, int(state.pending_token), int(state.token_count), rng, int(state.seed), seen)
