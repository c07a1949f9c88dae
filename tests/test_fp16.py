"""fp16 bundles: every float tensor in float16, the state inputs and outputs and the logits included, described so
in the manifest, verified against torch within the documented tolerance, and loadable on a CPU-only machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter import verify as verify_module
from exporter.publish import export_bundle, verify_bundle
from exporter.verify import FP16_RELATIVE_TOLERANCE, run_graph
from service.bundle import load_bundle
from service.context import Context
from service.engine import Engine
from service.models import ModelRegistry
from service.sequence import Finish, Sequence
from service.settings import ServerSettings
from textgen.errors import BundleError
from training.checkpoint import load_checkpoint, model_from_checkpoint

from live_server import wait_until

TEXTGEN = [sys.executable, "-m", "textgen.cli"]


@pytest.fixture(scope="module")
def fp16_bundle(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "tiny" / "2"
    export_bundle(trained_run / "best.pt", out, quantize="fp16")
    return out


def test_the_manifest_describes_float16_state_and_logits(fp16_bundle: Path) -> None:
    bundle = load_bundle(fp16_bundle)
    graph = bundle.manifest.graph
    assert graph.precision == "fp16"
    dtypes = {t.name: t.dtype for t in [*graph.inputs, *graph.outputs]}
    assert dtypes == {
        "tokens": "int64",
        "positions": "int64",
        **{name: "float16" for name in ("h", "c", "logits", "h_out", "c_out")},
    }
    # the graph agrees (the loader checked it) and keeps no float32 weight: the LSTMs are converted too
    assert [i.type for i in bundle.session.get_inputs()][2:] == ["tensor(float16)"] * 2
    model = onnx.load_from_string((fp16_bundle / "model.onnx").read_bytes())
    assert {t.data_type for t in model.graph.initializer} <= {onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64}
    assert bundle.providers == ["CPUExecutionProvider"]


def test_parity_and_quality_are_recorded_within_the_documented_tolerance(fp16_bundle: Path, trained_run: Path) -> None:
    manifest = load_bundle(fp16_bundle).manifest
    v, q = manifest.verification, manifest.quality
    assert v.tolerance is not None and v.tolerance >= FP16_RELATIVE_TOLERANCE
    assert 0 < v.max_abs_logit_diff <= v.tolerance and v.continuation_max_abs_diff <= v.tolerance
    assert q is not None and q.reference_precision == "fp32" and q.metric_name == "bpc"
    assert abs(q.loss_delta) < 0.01 and q.top1_agreement > 0.98
    # re-checked as `textgen export --verify-only` does
    report = verify_bundle(fp16_bundle, trained_run / "best.pt")
    assert report["precision"] == "fp16" and report["max_abs_logit_diff"] <= v.tolerance


def test_the_session_runs_float16_state_like_torch(fp16_bundle: Path, trained_run: Path) -> None:
    bundle = load_bundle(fp16_bundle)
    model, _ = model_from_checkpoint(load_checkpoint(trained_run / "best.pt"))
    cfg = model.config
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 20))
    zero = tuple(np.zeros((cfg.num_layers, 3, cfg.hidden_size), np.float16) for _ in cfg.state_names)
    feeds = {"tokens": tokens, "positions": np.arange(20), "h": zero[0], "c": zero[1]}
    logits, *state = bundle.session.run(None, feeds)
    assert logits.dtype == np.float16 and all(s.dtype == np.float16 for s in state)
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(tokens), model.init_state(3))
    tolerance = bundle.manifest.verification.tolerance
    assert np.abs(logits.astype(np.float32) - ref.numpy()).max() <= tolerance
    again, _ = run_graph(bundle.session, tokens, tuple(z.astype(np.float32) for z in zero), None)
    assert again.dtype == np.float32 and np.array_equal(again, logits.astype(np.float32))


def test_an_fp16_graph_outside_its_tolerance_is_not_published(
    tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verify_module, "FP16_RELATIVE_TOLERANCE", 1e-6)
    with pytest.raises(BundleError, match="ONNX Runtime and torch disagree"):
        export_bundle(trained_run / "best.pt", tmp_path / "tiny" / "1", quantize="fp16")
    assert not (tmp_path / "tiny" / "1").exists()


def test_the_cli_takes_one_precision(tmp_path: Path, trained_run: Path) -> None:
    out = str(tmp_path / "m" / "1")
    proc = subprocess.run(
        [*TEXTGEN, "export", str(trained_run / "best.pt"), "--out", out, "--precision", "fp16", "--quantize", "int8"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("--quantize int8 contradicts --precision fp16: give one")


def test_an_fp16_bundle_is_served_with_float16_state_on_the_device(fp16_bundle: Path) -> None:
    """The server keeps an fp16 bundle's state slots in float16 and hands sessions and snapshots float32 rows
    (float16 -> float32 is exact, so a snapshot resumes bit for bit)."""
    settings = ServerSettings(bundle=fp16_bundle, providers=["CPUExecutionProvider"])
    engine = Engine(next(iter(ModelRegistry.load(settings))), settings)
    model = engine.model
    assert model.state_dtype == np.float16 and engine.state.dtype == np.float16
    seq = Sequence(context=Context.fresh(model, 7), feed=np.array(model.tokenizer.encode("the qu")), max_tokens=12)
    engine.submit(seq)
    engine.start()
    try:
        wait_until(lambda: seq.result is not None, "the fp16 generation ended")
    finally:
        engine.stop()
    assert seq.result.finish is Finish.LENGTH and seq.generated == 12
    state = seq.result.context.state
    assert all(s.dtype == np.float32 and np.array_equal(s, s.astype(np.float16)) for s in state)
