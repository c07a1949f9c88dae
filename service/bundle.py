"""Loading a model bundle for serving, without torch: schema, format version, the directory's listing (exactly
the files the manifest names, plain regular files, no symbolic links), checksums, tokenizer, and the ONNX graph's
inputs and outputs against the manifest. Each fault is a ``BundleError`` naming the file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
from pydantic import ValidationError

from service.manifest import FORMAT_VERSION, MANIFEST, Manifest, TensorSpec, plain_file_name
from service.providers import ProviderChoice, cpu_only
from textgen.errors import BundleError, InvalidInputError
from textgen.tokenizer import TextTokenizer

_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(float16)": "float16"}


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    tokenizer: TextTokenizer
    session: ort.InferenceSession
    graph: bytes | None = None  # the verified graph's bytes, kept only when the loader was asked to
    # The providers the session really runs on, its device and CUDA options (see service.providers).
    execution: ProviderChoice = field(default_factory=cpu_only)

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses (not merely the ones available)."""
        return self.session.get_providers()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path``, which must be a regular file and not a symbolic link. O_NOFOLLOW makes the check
    and the read one system call, so the file cannot be swapped for a link in between."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleError(f"{path} is a symbolic link: bundle files must be regular files") from None
        raise BundleError(f"{path}: cannot read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BundleError(f"{path} is not a regular file")
        try:
            return f.read()
        except OSError as exc:
            raise BundleError(f"{path}: cannot read ({exc.strerror})") from None


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file() and not path.is_symlink():
        raise BundleError(f"{bundle_dir}: missing {MANIFEST}")
    try:
        raw = json.loads(_read_regular(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{path}: unknown format_version {version!r} (this textgen reads {FORMAT_VERSION})")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{path}: {where}: {first['msg']} ({exc.error_count()} schema error(s))") from None


def _check_listing(bundle_dir: Path, manifest: Manifest) -> None:
    """The bundle directory holds exactly the manifest and the files it lists, each a regular file: nothing
    unlisted (which nobody verified) is served beside them, and no name leads outside the directory."""
    for name in manifest.files:
        try:
            plain_file_name(name)  # the schema checks this too; the loader does not rely on how it was built
        except ValueError as exc:
            raise BundleError(f"{bundle_dir}: {MANIFEST}: {exc}") from None
    for required in (manifest.graph.file, manifest.tokenizer.file):
        if required not in manifest.files:
            raise BundleError(f"{bundle_dir}: {MANIFEST} has no checksum for {required}")
    try:
        with os.scandir(bundle_dir) as entries:
            present = {e.name: e for e in entries}
    except OSError as exc:
        raise BundleError(f"{bundle_dir}: cannot list the bundle directory ({exc.strerror})") from None
    unlisted = sorted(set(present) - set(manifest.files) - {MANIFEST})
    if unlisted:
        more = f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else ""
        shown = ", ".join(repr(n) for n in unlisted[:5]) + more
        raise BundleError(
            f"{bundle_dir}: unlisted file(s) in the bundle directory: {shown} "
            f"(a bundle holds exactly the files its {MANIFEST} lists)"
        )
    for name in manifest.files:
        entry = present.get(name)
        if entry is None:
            raise BundleError(f"{bundle_dir}: missing file {name}")
        if entry.is_symlink():
            raise BundleError(f"{bundle_dir / name} is a symbolic link: bundle files must be regular files")
        if not entry.is_file(follow_symlinks=False):
            raise BundleError(f"{bundle_dir / name} is not a regular file")


def verify_files(bundle_dir: Path, manifest: Manifest) -> dict[str, bytes]:
    """Check the listing and every checksum; returns each file's bytes. The graph and the tokenizer are then
    loaded from these very bytes, so what was verified is exactly what is served (no second read by path)."""
    bundle_dir = Path(bundle_dir)
    _check_listing(bundle_dir, manifest)
    contents = {}
    for name, expected in manifest.files.items():
        path = bundle_dir / name
        data = _read_regular(path)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise BundleError(f"{path}: checksum mismatch (sha256 {actual[:12]}..., manifest says {expected[:12]}...)")
        contents[name] = data
    return contents


def _check_io(kind: str, actual: list[ort.NodeArg], expected: list[TensorSpec], where: Path) -> None:
    got = [(a.name, _ORT_DTYPES.get(a.type, a.type), len(a.shape)) for a in actual]
    want = [(e.name, e.dtype, len(e.shape)) for e in expected]
    if got != want:
        raise BundleError(f"{where}: graph {kind} {got} do not match the manifest's {want}")
    for a, e in zip(actual, expected, strict=True):
        for axis, (dim, spec) in enumerate(zip(a.shape, e.shape, strict=True)):
            if isinstance(spec, int) and dim != spec:
                raise BundleError(f"{where}: {kind[:-1]} {e.name} axis {axis} is {dim}, the manifest says {spec}")


def load_bundle(
    bundle_dir: Path | str,
    providers: ProviderChoice | None = None,
    session_options: ort.SessionOptions | None = None,
    keep_graph: bool = False,
) -> Bundle:
    """Validate a bundle and open its ONNX Runtime session (CPU unless ``providers`` says otherwise). The choice is
    checked against the bundle's precision before the session is made and against the session's active providers
    after (``ProviderChoice.for_precision``, ``confirm``).

    No symbolic links: the bundle directory itself, its manifest and every file must be real (the directories
    above it are the operator's configuration and are not checked)."""
    bundle_dir = Path(bundle_dir)
    if bundle_dir.is_symlink():
        raise BundleError(f"{bundle_dir} is a symbolic link: give the bundle's real directory ({bundle_dir.resolve()})")
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory not found: {bundle_dir}")
    manifest = read_manifest(bundle_dir)
    contents = verify_files(bundle_dir, manifest)
    tok_info = manifest.tokenizer
    try:
        tokenizer = TextTokenizer.from_json(tok_info.level, contents[tok_info.file].decode("utf-8"))
    except (InvalidInputError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle_dir / tok_info.file}: {exc}") from None
    if tokenizer.vocab_size != manifest.model.vocab_size:
        raise BundleError(
            f"{bundle_dir}: tokenizer has {tokenizer.vocab_size} tokens, the model {manifest.model.vocab_size}"
        )
    graph_path = bundle_dir / manifest.graph.file
    choice = (providers or cpu_only()).for_precision(manifest.graph.precision, bundle_dir)
    try:
        session = ort.InferenceSession(
            contents[manifest.graph.file], sess_options=session_options, providers=choice.ort_providers
        )
    except Exception as exc:  # ORT raises its own exception types for unreadable graphs
        raise BundleError(f"{graph_path}: ONNX Runtime cannot load the graph: {str(exc).splitlines()[0]}") from None
    _check_io("inputs", session.get_inputs(), manifest.graph.inputs, graph_path)
    _check_io("outputs", session.get_outputs(), manifest.graph.outputs, graph_path)
    execution = choice.confirm(session.get_providers(), bundle_dir)
    graph = contents[manifest.graph.file] if keep_graph else None
    return Bundle(bundle_dir, manifest, tokenizer, session, graph, execution=execution)
