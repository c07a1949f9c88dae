from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporter import verify as verify_module
from exporter.publish import export_bundle, verify_bundle
from exporter.verify import run_graph
from service.bundle import load_bundle
from textgen.errors import BundleError
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.model import CELLS, ModelConfig, RNNLanguageModel
from training.run import run_train


def _checkpoint(tmp_path: Path, corpus_file: Path, cell: str = "lstm", level: str = "char") -> Path:
    run_train(
        {"cell": cell, "hidden_size": 16, "embedding_size": 8},
        {"path": str(corpus_file), "level": level},
        {"batch_size": 4, "bptt": 8, "max_steps": 2},
        tmp_path / "run",
        progress=False,
    )
    return tmp_path / "run" / "best.pt"


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_and_level_exports_verifies_and_loads(
    tmp_path: Path, corpus_file: Path, cell: str, level: str
) -> None:
    ckpt = _checkpoint(tmp_path, corpus_file, cell, level)
    manifest = export_bundle(ckpt, tmp_path / "bundles" / "m" / "1")
    assert manifest.verification.max_abs_logit_diff <= 1e-4
    assert manifest.verification.continuation_max_abs_diff <= 1e-4
    bundle = load_bundle(tmp_path / "bundles" / "m" / "1")
    assert bundle.manifest.model.cell == cell and bundle.tokenizer.level.value == level
    assert bundle.manifest.graph.state == (["h", "c"] if cell == "lstm" else ["h"])
    assert bundle.providers == ["CPUExecutionProvider"]
    assert [p.name for p in (tmp_path / "bundles" / "m").iterdir()] == ["1"]  # no staging directory left


def test_graph_axes_are_dynamic_and_positions_select_logits(tmp_path: Path, trained_run: Path) -> None:
    export_bundle(trained_run / "best.pt", tmp_path / "b" / "1")
    bundle = load_bundle(tmp_path / "b" / "1")
    model, _ = model_from_checkpoint(load_checkpoint(trained_run / "best.pt"))
    cfg = model.config
    for batch, length in ((1, 1), (5, 50), (64, 3)):
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, length))
        state = tuple(np.zeros((cfg.num_layers, batch, cfg.hidden_size), np.float32) for _ in cfg.state_names)
        every, new_state = run_graph(bundle.session, tokens, state, None)
        last, _ = run_graph(bundle.session, tokens, state, np.array([length - 1]))
        assert every.shape == (batch, length, cfg.vocab_size) and last.shape == (batch, 1, cfg.vocab_size)
        assert np.allclose(every[:, -1], last[:, 0], atol=1e-6)
        assert new_state[0].shape == (cfg.num_layers, batch, cfg.hidden_size)


def test_int8_bundle_records_its_quality_change(tmp_path: Path, trained_run: Path) -> None:
    manifest = export_bundle(trained_run / "best.pt", tmp_path / "b" / "2", quantize="int8")
    q = manifest.quality
    assert manifest.graph.precision == "int8" and q is not None
    assert q.metric_name == "bpc" and q.tokens > 0 and 0.5 < q.top1_agreement <= 1.0
    assert abs(q.loss_delta) < 0.5
    assert (tmp_path / "b" / "2" / "model.onnx").stat().st_size < 0.6 * _fp32_size(tmp_path, trained_run)


def _fp32_size(tmp_path: Path, trained_run: Path) -> int:
    export_bundle(trained_run / "best.pt", tmp_path / "b" / "1")
    return (tmp_path / "b" / "1" / "model.onnx").stat().st_size


def test_failed_verification_publishes_nothing(
    tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verify_module, "FP32_TOLERANCE", -1.0)  # no graph can pass
    monkeypatch.setattr("exporter.publish.FP32_TOLERANCE", -1.0)
    with pytest.raises(BundleError, match="disagree"):
        export_bundle(trained_run / "best.pt", tmp_path / "b" / "1")
    assert not (tmp_path / "b" / "1").exists()


def test_versions_are_immutable(tmp_path: Path, trained_run: Path) -> None:
    export_bundle(trained_run / "best.pt", tmp_path / "b" / "1")
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(trained_run / "best.pt", tmp_path / "b" / "1")


def test_verify_only_rechecks_an_existing_bundle(tmp_path: Path, trained_run: Path) -> None:
    export_bundle(trained_run / "best.pt", tmp_path / "b" / "1")
    report = verify_bundle(tmp_path / "b" / "1", trained_run / "best.pt")
    assert report["max_abs_logit_diff"] <= 1e-4


# -- the loader rejects each kind of fault ------------------------------------------------------------------


@pytest.fixture
def bundle_dir(tmp_path: Path, trained_run: Path) -> Path:
    export_bundle(trained_run / "best.pt", tmp_path / "b" / "1")
    return tmp_path / "b" / "1"


def _edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_loader_missing_file(bundle_dir: Path) -> None:
    (bundle_dir / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"missing file tokenizer\.json"):
        load_bundle(bundle_dir)


def test_loader_missing_manifest(bundle_dir: Path) -> None:
    (bundle_dir / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"missing manifest\.json"):
        load_bundle(bundle_dir)


def test_loader_checksum_mismatch(bundle_dir: Path) -> None:
    with (bundle_dir / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"model\.onnx: checksum mismatch"):
        load_bundle(bundle_dir)


def test_loader_unknown_format_version(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="unknown format_version 99"):
        load_bundle(bundle_dir)


def test_loader_schema_error_names_the_field(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m["model"].update(cell="transformer"))
    with pytest.raises(BundleError, match=r"model\.cell"):
        load_bundle(bundle_dir)


def test_loader_io_mismatch(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda m: m["graph"]["inputs"][0].update(name="input_ids"))
    with pytest.raises(BundleError, match=r"graph inputs .* do not match"):
        load_bundle(bundle_dir)


def test_loader_corrupted_onnx(bundle_dir: Path) -> None:
    onnx_path = bundle_dir / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:1000])
    from service.bundle import sha256_file

    _edit_manifest(bundle_dir, lambda m: m["files"].update({"model.onnx": sha256_file(onnx_path)}))
    with pytest.raises(BundleError, match="ONNX Runtime cannot load the graph"):
        load_bundle(bundle_dir)


def test_loader_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")


def test_copied_bundle_still_loads(bundle_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(bundle_dir, tmp_path / "elsewhere" / "1")
    assert load_bundle(tmp_path / "elsewhere" / "1").manifest.name == "b"


def test_quantize_leaves_the_root_logger_as_it_was(caplog: pytest.LogCaptureFixture) -> None:
    from exporter.graph import export_onnx
    from exporter.quantize import _QUANTIZATION_PACKAGE, quantize_int8

    model = RNNLanguageModel(ModelConfig(vocab_size=20, hidden_size=16, embedding_size=8)).eval()
    root, named = logging.getLogger(), logging.getLogger("onnxruntime.quantization")
    with caplog.at_level(logging.INFO):  # the root logger at INFO, as an application might have it
        filters, named_level = list(root.filters), named.level
        quantized = quantize_int8(export_onnx(model))
        assert root.level == logging.INFO and root.filters == filters and named.level == named_level
        logging.getLogger("textgen.after").info("still heard")
    assert len(quantized) > 0
    advice = [r for r in caplog.records if Path(r.pathname).is_relative_to(_QUANTIZATION_PACKAGE)]
    assert advice == []  # its "run pre-processing first" warning and INFO chatter were held back meanwhile
    assert [r.getMessage() for r in caplog.records if r.name == "textgen.after"] == ["still heard"]


def test_bundle_files_and_directories_are_fsynced_around_the_rename(
    tmp_path: Path, trained_run: Path, monkeypatch: pytest.MonkeyPatch, durability_events: list[tuple[str, str]]
) -> None:
    events = durability_events
    out = tmp_path / "repo" / "m" / "1"
    export_bundle(trained_run / "best.pt", out)
    monkeypatch.undo()
    (staging,) = [path for kind, path in events if kind == "rename"]
    done = events.index(("rename", staging))
    synced_before = {path for kind, path in events[:done] if kind == "fsync"}
    assert {f"{staging}/{name}" for name in ("model.onnx", "tokenizer.json", "manifest.json")} <= synced_before
    assert events[done - 1] == ("fsync", staging)  # the staging directory's entries, last before the rename
    assert events[done + 1] == ("fsync", str(out.parent))  # the rename itself, right after
    assert str(tmp_path / "repo") in synced_before  # the model directory the export created
    assert load_bundle(out).manifest.name == "m"
