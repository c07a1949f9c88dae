"""Model loading at start-up: a bad bundle in a model repository is skipped (logged) for the model's previous good
version, a killed export's staging directory is never served, and a bundle's files are exactly the plain, regular,
listed files of its manifest."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from service.bundle import load_bundle, sha256_file
from service.manifest import STAGING_PREFIX, STAGING_SUFFIX, is_version_dir_name
from service.models import ModelRegistry
from service.server import BackgroundServer
from service.settings import load_settings
from textgen.client import Client
from textgen.errors import BundleError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sources(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One good bundle per model name, exported once; tests copy them into repositories of their own."""
    from exporter.publish import export_bundle

    root = tmp_path_factory.mktemp("sources")
    for name in ("tiny", "other"):
        export_bundle(trained_run / "best.pt", root / name / "1")
    return {name: root / name / "1" for name in ("tiny", "other")}


def _settings(**kw: object):
    return load_settings(port=0, providers=["CPUExecutionProvider"], intra_op_threads=1, **kw)


def _edit_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _bad_checksum(bundle: Path) -> None:
    with (bundle / "model.onnx").open("ab") as f:
        f.write(b"\0")


def _bad_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").write_text("{ not json")


def _corrupted_onnx(bundle: Path) -> None:
    graph = bundle / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    _edit_manifest(bundle, lambda m: m["files"].update({"model.onnx": sha256_file(graph)}))


def _failing_warm_up(bundle: Path) -> None:
    # The graph's I/O still matches the manifest's, but the state the warm-up feeds has the wrong width.
    _edit_manifest(bundle, lambda m: m["model"].update(hidden_size=m["model"]["hidden_size"] + 1))


FAULTS = {
    "checksum": (_bad_checksum, "checksum mismatch"),
    "manifest": (_bad_manifest, "not valid JSON"),
    "onnx": (_corrupted_onnx, "ONNX Runtime cannot load the graph"),
    "warm-up": (_failing_warm_up, "the warm-up run failed"),
}


def _repository(root: Path, sources: dict[str, Path], layout: dict[str, list[str | None]]) -> Path:
    """``layout``: model -> one entry per version 1, 2, ...: None for a good copy, else the FAULTS key."""
    for name, versions in layout.items():
        for number, fault in enumerate(versions, start=1):
            target = root / name / str(number)
            shutil.copytree(sources[name], target)
            if fault is not None:
                FAULTS[fault][0](target)
    return root


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_newest_version_falls_back_to_the_previous_good_one(
    tmp_path: Path, sources: dict[str, Path], caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    repo = _repository(tmp_path, sources, {"tiny": [None, fault], "other": [None]})
    with caplog.at_level(logging.INFO, logger="textgen.models"):
        registry = ModelRegistry.load(_settings(model_repository=repo))
    assert {m.name: m.bundle.path for m in registry} == {"other": repo / "other" / "1", "tiny": repo / "tiny" / "1"}
    (skipped,) = registry.skipped
    assert skipped.path == repo / "tiny" / "2" and FAULTS[fault][1] in skipped.reason
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"skipping bundle {repo / 'tiny' / '2'}: {skipped.reason}"]


def test_a_model_with_no_loadable_version_is_skipped_and_the_others_served(
    tmp_path: Path, sources: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    repo = _repository(tmp_path, sources, {"tiny": ["checksum", "onnx"], "other": [None]})
    with caplog.at_level(logging.INFO, logger="textgen.models"):
        server = BackgroundServer(_settings(model_repository=repo))
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            assert [m.name for m in client.list_models()] == ["other"]
            assert client.generate("ab", max_tokens=5, seed=1).text
    finally:
        server.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors[-1] == "model tiny skipped: none of its 2 version(s) loads"
    assert [e.split(":")[0] for e in errors[:2]] == [f"skipping bundle {repo / 'tiny' / v}" for v in ("2", "1")]


def test_a_bundle_in_the_wrong_model_directory_is_skipped(tmp_path: Path, sources: dict[str, Path]) -> None:
    repo = _repository(tmp_path, sources, {"tiny": [None]})
    shutil.copytree(sources["other"], repo / "tiny" / "2")  # its manifest says "other"
    registry = ModelRegistry.load(_settings(model_repository=repo))
    assert [m.bundle.path for m in registry] == [repo / "tiny" / "1"]
    assert "its manifest names model 'other', but it lies in tiny/" in registry.skipped[0].reason


def test_the_server_refuses_to_start_only_when_no_model_loads(tmp_path: Path, sources: dict[str, Path]) -> None:
    repo = _repository(tmp_path, sources, {"tiny": ["checksum"], "other": ["manifest"]})
    proc = subprocess.run(
        [sys.executable, "-m", "textgen.cli", "serve", "--model-repository", str(repo), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"textgen serve: error: model repository {repo}: no model could be loaded (")
    assert "tiny/1/model.onnx: checksum mismatch" in last and "other/1/manifest.json: not valid JSON" in last


def test_an_explicit_bad_bundle_is_a_start_up_error(tmp_path: Path, sources: dict[str, Path]) -> None:
    repo = _repository(tmp_path, sources, {"tiny": [None, "checksum"]})
    with pytest.raises(BundleError, match="checksum mismatch"):
        ModelRegistry.load(_settings(bundle=repo / "tiny" / "2"))


# -- a killed export -----------------------------------------------------------------------------------------

_KILLED_EXPORT = """
import os, signal, sys
from pathlib import Path
from exporter.publish import export_bundle

def killed(self, target):  # the process dies at the last moment, with no chance to clean up
    os.kill(os.getpid(), signal.SIGKILL)

Path.rename = killed
export_bundle(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_a_killed_exports_staging_directory_is_never_served(
    tmp_path: Path, trained_run: Path, sources: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_EXPORT, str(trained_run / "best.pt"), str(repo / "tiny" / "1")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (staging,) = (repo / "tiny").iterdir()
    assert staging.name.startswith(STAGING_PREFIX + "1.") and staging.name.endswith(STAGING_SUFFIX)
    assert not is_version_dir_name(staging.name)
    assert load_bundle(staging).manifest.name == "tiny"  # complete and valid: only its name keeps it out

    with pytest.raises(BundleError, match=r"holds no <model>/<version>/manifest\.json bundle"):
        ModelRegistry.load(_settings(model_repository=repo))
    shutil.copytree(sources["tiny"], repo / "tiny" / "1")
    for name in ("2.partial", "02", "latest"):  # other names that are not versions
        shutil.copytree(sources["tiny"], repo / "tiny" / name)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="textgen.models"):
        registry = ModelRegistry.load(_settings(model_repository=repo))
    assert [m.bundle.path for m in registry] == [repo / "tiny" / "1"] and not registry.skipped
    ignored = sorted(r.getMessage().split(":")[0] for r in caplog.records if r.levelno == logging.WARNING)
    assert ignored == sorted(f"ignoring {repo / 'tiny' / n}" for n in (staging.name, "2.partial", "02", "latest"))


def test_the_exporter_refuses_a_version_name_a_repository_would_ignore(tmp_path: Path, trained_run: Path) -> None:
    from exporter.publish import export_bundle

    for name in ("v1", "01", "0"):
        with pytest.raises(BundleError, match=r"must be named 1, 2, \.\.\."):
            export_bundle(trained_run / "best.pt", tmp_path / "tiny" / name)
    assert not (tmp_path / "tiny").exists()


# -- what a bundle directory may hold ------------------------------------------------------------------------


@pytest.fixture
def bundle(tmp_path: Path, sources: dict[str, Path]) -> Path:
    target = tmp_path / "tiny" / "1"
    shutil.copytree(sources["tiny"], target)
    return target


@pytest.mark.parametrize("name", ["../model.onnx", "/etc/passwd", "sub/model.onnx", "..", ".", "", "a\\b"])
def test_manifest_file_names_must_be_plain_names(bundle: Path, name: str) -> None:
    digest = sha256_file(bundle / "model.onnx")
    _edit_manifest(bundle, lambda m: m["files"].update({name: digest}))
    with pytest.raises(BundleError, match=r"manifest\.json: files\..*(plain name|not a file name)"):
        load_bundle(bundle)


@pytest.mark.parametrize("section", ["graph", "tokenizer"])
def test_the_graph_and_tokenizer_file_names_must_be_plain_names(bundle: Path, section: str) -> None:
    _edit_manifest(bundle, lambda m: m[section].update(file="../../outside.bin"))
    with pytest.raises(BundleError, match=rf"{section}\.file: .*plain name inside the bundle"):
        load_bundle(bundle)


def test_the_manifest_cannot_list_itself(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m["files"].update({"manifest.json": "0" * 64}))
    with pytest.raises(BundleError, match="is the manifest itself"):
        load_bundle(bundle)


def test_an_unlisted_file_is_refused(bundle: Path) -> None:
    (bundle / "notes.txt").write_text("hello")
    with pytest.raises(BundleError, match=r"unlisted file\(s\) in the bundle directory: 'notes.txt'"):
        load_bundle(bundle)


def test_an_unlisted_directory_is_refused(bundle: Path) -> None:
    (bundle / "extra").mkdir()
    with pytest.raises(BundleError, match=r"unlisted file.*'extra'"):
        load_bundle(bundle)


@pytest.mark.parametrize("name", ["tokenizer.json", "model.onnx", "manifest.json"])
def test_a_symlinked_file_is_refused_even_with_the_right_contents(bundle: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / f"outside-{name}"
    shutil.move(bundle / name, outside)
    os.symlink(outside, bundle / name)
    with pytest.raises(BundleError, match=f"{name} is a symbolic link"):
        load_bundle(bundle)


def test_a_symlinked_bundle_directory_is_refused(bundle: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    os.symlink(bundle, link)
    with pytest.raises(BundleError, match="is a symbolic link: give the bundle's real directory"):
        load_bundle(link)
    assert load_bundle(bundle).manifest.name == "tiny"


def test_a_non_hex_checksum_is_a_schema_error(bundle: Path) -> None:
    _edit_manifest(bundle, lambda m: m["files"].update({"model.onnx": "not-a-sha256"}))
    with pytest.raises(BundleError, match=r"files\.model\.onnx"):
        load_bundle(bundle)
