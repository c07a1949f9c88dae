"""Snapshot keys: reading and validating the keyring that seals and opens state snapshots, and ``textgen keygen``.

A keyring is an ordered list of ``(key id, secret)``: the first key seals new snapshots, every key opens the ones
sealed under it. A key is rotated by adding a new one, moving it first once every replica holds it, and removing
the old one once the snapshots it sealed have expired (README, Snapshot keys). It comes from a file
(``snapshot_key_file``: one key a line, ``#`` comments) or from the environment (``TEXTGEN_SNAPSHOT_KEY``: one
key), never from a command-line value, which any user can read in ``ps``. A line is ``key-id:key`` or a bare
``key`` (its id is then a fingerprint of the key); the key is hex or base64 (standard or URL-safe) and at least
256 bits.

The file may be readable by others: container secret mounts present it that way (compose bind-mounts the host
file with its own mode, Kubernetes secret volumes default to 0644) in a container whose only user is the
server. It may not be writable by every user, who could then swap in a key of their own. Nothing here imports a
third-party package, so ``textgen keygen`` and ``textgen --help`` stay instant."""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import re
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textgen.errors import ConfigError

if TYPE_CHECKING:
    from service.settings import ServerSettings

KEY_BYTES = 32  # 256 bits: AES-256's key size, and the least a key may hold
MAX_KEY_BYTES = 1024  # anything longer is a mistake (a certificate, a whole file), not a key
MAX_FILE_BYTES = 1 << 16
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+")


def valid_key_id(key_id: str) -> bool:
    """Key ids are short and plain, so that one read from a snapshot can be quoted in an error message safely."""
    return _KEY_ID.fullmatch(key_id) is not None


@dataclass(frozen=True)
class SnapshotKey:
    id: str
    secret: bytes = field(repr=False)  # never in a log line or a traceback


@dataclass(frozen=True)
class Keyring:
    """Keys in order: ``keys[0]`` seals, all of them open."""

    keys: tuple[SnapshotKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("no keys")
        ids = [k.id for k in self.keys]
        duplicate = next((i for i in ids if ids.count(i) > 1), None)
        if duplicate is not None:
            raise ValueError(f"key id {duplicate!r} appears twice")

    @property
    def active(self) -> SnapshotKey:
        return self.keys[0]

    def find(self, key_id: str) -> SnapshotKey | None:
        return next((k for k in self.keys if k.id == key_id), None)

    @classmethod
    def ephemeral(cls) -> Keyring:
        """A random key of this process alone (no key configured): its snapshots open nowhere else."""
        return cls((SnapshotKey(f"ephemeral-{secrets.token_hex(4)}", secrets.token_bytes(KEY_BYTES)),))


def _decode(material: str) -> bytes:
    # Hex whenever it can be: a base64 key made only of hex digits is vanishingly unlikely (p < 4^-40).
    if _HEX.fullmatch(material):
        return bytes.fromhex(material)
    standard = material.replace("-", "+").replace("_", "/")  # URL-safe base64 too
    try:
        return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key is neither hex nor base64") from None


def fingerprint_id(secret: bytes) -> str:
    """The id of a key given without one: a short hash of it, so two different bare keys never share an id."""
    return hashlib.sha256(b"textgen snapshot key id\0" + secret).hexdigest()[:12]


def parse_key(text: str) -> SnapshotKey:
    """One ``[key-id:]key``; ``ValueError`` says what is wrong without quoting the key."""
    key_id, sep, material = text.strip().rpartition(":")
    material = material.strip()
    if not material:
        raise ValueError("empty key")
    secret = _decode(material)
    if len(secret) < KEY_BYTES:
        raise ValueError(
            f"the key is {len(secret)} bytes ({8 * len(secret)} bits); a snapshot key needs at least {KEY_BYTES} "
            f"bytes ({8 * KEY_BYTES} bits): make one with `textgen keygen`"
        )
    if len(secret) > MAX_KEY_BYTES:
        raise ValueError(f"the key is {len(secret)} bytes, more than {MAX_KEY_BYTES}: not a key")
    key_id = key_id.strip() if sep else fingerprint_id(secret)
    if not valid_key_id(key_id):
        raise ValueError("a key id is 1 to 64 of the characters A-Z a-z 0-9 . _ -")
    return SnapshotKey(key_id, secret)


def parse_keyring(text: str) -> Keyring:
    """Keys one a line, the first the active one; blank lines and ``#`` comments are skipped."""
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            keys.append(parse_key(line))
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    if not keys:
        raise ValueError("no keys in the file (one `key-id:key` a line; make one with `textgen keygen`)")
    return Keyring(tuple(keys))


def read_keyring_file(path: Path) -> Keyring:
    """The keyring in ``path``; ``ValueError`` names what is wrong with the file (never its contents)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_mode & stat.S_IWOTH:
            raise ValueError(
                f"{path} is writable by every user (mode {stat.S_IMODE(info.st_mode):04o}), who could put in a key "
                f"of their own: chmod o-w {path}"
            )
        if info.st_size > MAX_FILE_BYTES:
            raise ValueError(f"{path} is {info.st_size} bytes: too large for a keyring")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"no such file {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    return parse_keyring(text)


def load_keyring(settings: ServerSettings) -> Keyring | None:
    """The configured keyring (None when no key is configured); ``ConfigError`` naming the setting otherwise.
    The settings already checked both sources at start-up; this reads them for use."""
    try:
        if settings.snapshot_key_file is not None:
            return read_keyring_file(settings.snapshot_key_file)
    except ValueError as exc:
        raise ConfigError(f"snapshot_key_file (TEXTGEN_SNAPSHOT_KEY_FILE): {exc}") from None
    try:
        if settings.snapshot_key is not None:
            return Keyring((parse_key(settings.snapshot_key.get_secret_value()),))
    except ValueError as exc:
        raise ConfigError(f"snapshot_key (TEXTGEN_SNAPSHOT_KEY): {exc}") from None
    return None


def new_key_line(key_id: str | None = None) -> str:
    """A fresh keyring line ``key-id:base64-key`` from the operating system's CSPRNG; the default id is the UTC
    date and a random suffix, so a keyring shows at a glance how old each key is."""
    key_id = key_id or f"{time.strftime('%Y%m%d', time.gmtime())}-{secrets.token_hex(3)}"
    if not valid_key_id(key_id):
        raise ConfigError("--id: a key id is 1 to 64 of the characters A-Z a-z 0-9 . _ -")
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode('ascii')}"


def register(commands: Any) -> None:
    p = commands.add_parser(
        "keygen",
        help="print a new snapshot key (a keyring line for TEXTGEN_SNAPSHOT_KEY_FILE)",
        description="Print a new 256-bit snapshot key as a keyring line `key-id:base64-key`. Put it first in the "
        "keyring file (TEXTGEN_SNAPSHOT_KEY_FILE) to make it the key that seals; keep older keys below it until "
        "the snapshots they sealed have expired (snapshot_max_age_seconds). Example: "
        "(umask 077; textgen keygen > snapshot-keys)",
    )
    p.add_argument("--id", dest="key_id", default=None, help="the key id (default: today's UTC date and a suffix)")
    p.set_defaults(handler=_keygen)


def _keygen(args: argparse.Namespace) -> int:
    sys.stdout.write(new_key_line(args.key_id) + "\n")
    return 0
