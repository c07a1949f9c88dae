"""Loading a model bundle for serving, without torch: schema, format version, checksums, tokenizer, and the
ONNX graph's inputs and outputs against the manifest. Each fault is a ``BundleError`` naming the file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from pydantic import ValidationError

from service.manifest import FORMAT_VERSION, MANIFEST, Manifest, TensorSpec
from textgen.errors import BundleError, InvalidInputError
from textgen.tokenizer import TextTokenizer

_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(float16)": "float16"}


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    tokenizer: TextTokenizer
    session: ort.InferenceSession

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


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: missing {MANIFEST}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
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


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    bundle_dir = Path(bundle_dir)
    for required in (manifest.graph.file, manifest.tokenizer.file):
        if required not in manifest.files:
            raise BundleError(f"{bundle_dir}: {MANIFEST} has no checksum for {required}")
    for name, expected in manifest.files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{bundle_dir}: missing file {name}")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"{path}: checksum mismatch (sha256 {actual[:12]}..., manifest says {expected[:12]}...)")


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
    providers: list[str] | None = None,
    session_options: ort.SessionOptions | None = None,
) -> Bundle:
    """Validate a bundle and open its ONNX Runtime session (CPU unless ``providers`` says otherwise)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory not found: {bundle_dir}")
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    tok_info = manifest.tokenizer
    try:
        tokenizer = TextTokenizer.from_json(tok_info.level, (bundle_dir / tok_info.file).read_text(encoding="utf-8"))
    except InvalidInputError as exc:
        raise BundleError(f"{bundle_dir / tok_info.file}: {exc}") from None
    if tokenizer.vocab_size != manifest.model.vocab_size:
        raise BundleError(
            f"{bundle_dir}: tokenizer has {tokenizer.vocab_size} tokens, the model {manifest.model.vocab_size}"
        )
    graph_path = bundle_dir / manifest.graph.file
    try:
        session = ort.InferenceSession(
            str(graph_path), sess_options=session_options, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises its own exception types for unreadable graphs
        raise BundleError(f"{graph_path}: ONNX Runtime cannot load the graph: {str(exc).splitlines()[0]}") from None
    _check_io("inputs", session.get_inputs(), manifest.graph.inputs, graph_path)
    _check_io("outputs", session.get_outputs(), manifest.graph.outputs, graph_path)
    return Bundle(bundle_dir, manifest, tokenizer, session)
