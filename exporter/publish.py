"""Checkpoint -> model bundle. Everything is written into a temporary sibling directory, fsynced, verified there,
and renamed into place last: a failed, interrupted or crashed export never leaves a directory a model repository
would serve (the staging name is one the loader skips), and a finished one survives a power cut."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import onnx
import torch

from exporter.graph import OPSET, export_onnx, input_names, output_names
from exporter.verify import (
    FP32_TOLERANCE,
    ParityReport,
    check_graph,
    check_parity,
    cpu_session,
    fp16_tolerance,
    require_parity,
)
from service.bundle import load_bundle, sha256_file
from service.manifest import (
    DETOKENIZE_RULES,
    FORMAT_VERSION,
    MANIFEST,
    STAGING_PREFIX,
    STAGING_SUFFIX,
    Manifest,
    is_version_dir_name,
)
from textgen import __version__
from textgen.errors import BundleError
from textgen.tokenizer import EOS, UNK, Level, TextTokenizer
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.durable import fsync_directory, make_directories_durably, write_file_durably
from training.model import RNNLanguageModel


def _source_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _io_specs(model: RNNLanguageModel, precision: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    cfg = model.config
    names = cfg.state_names
    state_shape = [cfg.num_layers, "batch", cfg.hidden_size]
    real = "float16" if precision == "fp16" else "float32"  # int8 keeps float32 I/O (only weights are int8)
    inputs = [
        {"name": "tokens", "dtype": "int64", "shape": ["batch", "time"]},
        {"name": "positions", "dtype": "int64", "shape": ["positions"]},
    ]
    inputs += [{"name": n, "dtype": real, "shape": state_shape} for n in names]
    outputs = [{"name": "logits", "dtype": real, "shape": ["batch", "positions", cfg.vocab_size]}]
    outputs += [{"name": f"{n}_out", "dtype": real, "shape": state_shape} for n in names]
    assert [i["name"] for i in inputs] == input_names(names)
    assert [o["name"] for o in outputs] == output_names(names)
    return inputs, outputs


def build_manifest(
    name: str,
    version: str,
    ckpt: dict[str, Any],
    checkpoint_sha: str,
    model: RNNLanguageModel,
    tokenizer: TextTokenizer,
    precision: str,
    parity: ParityReport,
    tolerance: float | None,
    files: dict[str, str],
    quality: dict[str, Any] | None = None,
) -> Manifest:
    cfg = model.config
    inputs, outputs = _io_specs(model, precision)
    metrics = ckpt.get("metrics", {})
    return Manifest.model_validate(
        {
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "model": {
                "cell": cfg.cell,
                "num_layers": cfg.num_layers,
                "hidden_size": cfg.hidden_size,
                "embedding_size": cfg.embedding_size,
                "vocab_size": cfg.vocab_size,
                "tie_weights": cfg.tie_weights,
                "parameters": model.num_parameters(),
            },
            "tokenizer": {
                "level": tokenizer.level.value,
                "vocab_size": tokenizer.vocab_size,
                "unk_token": UNK,
                "eos_token": EOS if tokenizer.level is Level.WORD else None,
                "start_token": tokenizer.id_to_token[tokenizer.start_id],
                "detokenize": DETOKENIZE_RULES[tokenizer.level.value],
            },
            "graph": {
                "opset": OPSET,
                "precision": precision,
                "inputs": inputs,
                "outputs": outputs,
                "state": list(cfg.state_names),
            },
            "provenance": {
                "data": ckpt.get("data_description", ""),
                "steps": ckpt["step"],
                "epochs": ckpt["epoch"],
                "val_loss": metrics.get("val_loss"),
                "val_bpc": metrics.get("val_bpc"),
                "val_perplexity": metrics.get("val_perplexity"),
                "checkpoint_sha256": checkpoint_sha,
                "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "source_revision": _source_revision(),
                "textgen_version": __version__,
                "torch_version": torch.__version__,
                "onnx_version": onnx.__version__,
            },
            "verification": {
                "max_abs_logit_diff": parity.max_abs_logit_diff,
                "continuation_max_abs_diff": parity.continuation_max_abs_diff,
                "tolerance": tolerance,
                "batch_sizes": list(parity.batch_sizes),
                "lengths": list(parity.lengths),
            },
            "quality": quality,
            "files": files,
        }
    )


def export_bundle(
    checkpoint_path: Path, out_dir: Path, quantize: str | None = None, quality_tokens: int = 20_000
) -> Manifest:
    """Export ``checkpoint_path`` to the bundle directory ``out_dir`` (``<name>/<version>``). ``quantize`` picks the
    precision: None or "fp32", "int8" (dynamic quantization, CPU) or "fp16" (GPU)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise BundleError(f"{out_dir} already exists: bundle versions are immutable, export to a new version")
    name, version = out_dir.parent.name, out_dir.name
    if not is_version_dir_name(version):
        # A model repository serves only such names; a bundle it would silently ignore is a mistake.
        raise BundleError(
            f"{out_dir}: the version directory must be named 1, 2, ... (no leading zeros), not {version!r}"
        )
    ckpt = load_checkpoint(checkpoint_path)
    model, tokenizer = model_from_checkpoint(ckpt)
    onnx_bytes = export_onnx(model)
    check_graph(onnx_bytes)
    fp32_session = cpu_session(onnx_bytes)
    quality = None
    if quantize in (None, "fp32"):
        precision, tolerance = "fp32", FP32_TOLERANCE
        parity = check_parity(model, fp32_session, tolerance)
        graph_bytes = onnx_bytes
    elif quantize == "int8":
        from exporter.quantize import measure_quality, quantize_int8

        precision, tolerance = "int8", None
        graph_bytes = quantize_int8(onnx_bytes)
        check_graph(graph_bytes)
        check_parity(model, fp32_session, FP32_TOLERANCE)  # the source graph itself must be right
        parity = check_parity(model, cpu_session(graph_bytes), None)
        quality = measure_quality(ckpt, fp32_session, cpu_session(graph_bytes), quality_tokens)
    elif quantize == "fp16":
        from exporter.quantize import convert_fp16, measure_quality

        precision = "fp16"
        graph_bytes = convert_fp16(onnx_bytes)
        check_graph(graph_bytes)
        check_parity(model, fp32_session, FP32_TOLERANCE)
        fp16_session = cpu_session(graph_bytes)
        parity = check_parity(model, fp16_session, None)
        tolerance = fp16_tolerance(parity.scale)
        require_parity(parity, tolerance)
        quality = measure_quality(ckpt, fp32_session, fp16_session, quality_tokens)
    else:
        raise BundleError(f"unknown precision {quantize!r}: choose fp32, fp16 or int8")

    make_directories_durably(out_dir.parent)
    # The staging directory is a sibling (a rename within one filesystem is atomic) whose name a model
    # repository never serves: '.'-prefixed, never a version name, so a killed export leaves nothing servable.
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}.", suffix=STAGING_SUFFIX, dir=out_dir.parent))
    assert not is_version_dir_name(staging.name)
    try:
        write_file_durably(staging / "model.onnx", graph_bytes)
        write_file_durably(staging / "tokenizer.json", tokenizer.to_json().encode("utf-8"))
        files = {f: sha256_file(staging / f) for f in ("model.onnx", "tokenizer.json")}
        manifest = build_manifest(
            name,
            version,
            ckpt,
            hashlib.sha256(Path(checkpoint_path).read_bytes()).hexdigest(),
            model,
            tokenizer,
            precision,
            parity,
            tolerance,
            files,
            quality,
        )
        manifest_json = json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
        write_file_durably(staging / MANIFEST, manifest_json.encode("utf-8"))
        load_bundle(staging)  # exactly what the service will do
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is read by the serving user
        # Every file is fsynced; now the staging directory's entries, then the rename in the model directory.
        fsync_directory(staging)
        staging.rename(out_dir)
        fsync_directory(out_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def verify_bundle(bundle_dir: Path, checkpoint_path: Path | None = None) -> dict[str, Any]:
    """Re-check a published bundle as the service would load it; with the checkpoint, re-run parity too."""
    bundle = load_bundle(bundle_dir)
    report: dict[str, Any] = {"precision": bundle.manifest.graph.precision, "files": len(bundle.manifest.files)}
    if checkpoint_path is not None:
        ckpt = load_checkpoint(checkpoint_path)
        model, tokenizer = model_from_checkpoint(ckpt)
        if tokenizer != bundle.tokenizer:
            raise BundleError(f"{bundle_dir}: its tokenizer differs from the checkpoint's")
        tolerance = bundle.manifest.verification.tolerance
        parity = check_parity(model, bundle.session, tolerance)
        report.update(
            max_abs_logit_diff=parity.max_abs_logit_diff, continuation_max_abs_diff=parity.continuation_max_abs_diff
        )
    return report
