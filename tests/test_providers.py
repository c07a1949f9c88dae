"""Execution providers: auto asks for CUDA only where a GPU is present, a provider named explicitly must be active
(or the server does not start, unless told to fall back), a misspelled name fails before any session, and an int8
bundle is refused on CUDA. The start-up paths run the real `textgen serve` on a machine whose onnxruntime-gpu lists
CUDA without a GPU to run it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import onnxruntime as ort
import pytest

from service import providers as providers_module
from service.providers import CPU, CUDA, ProviderChoice, choose_providers, cpu_only, nvidia_gpu_present
from service.settings import load_settings
from textgen.errors import BundleError, ConfigError

TEXTGEN = [sys.executable, "-m", "textgen.cli"]
ORT_CUDA_FAILURE = "Failed to create CUDAExecutionProvider"
needs_no_gpu = pytest.mark.skipif(nvidia_gpu_present(), reason="this machine has a GPU: CUDA would start")
needs_ort_cuda = pytest.mark.skipif(
    CUDA not in ort.get_available_providers(), reason="this ONNX Runtime build has no CUDA provider (onnxruntime)"
)


@pytest.fixture(scope="module")
def bundle(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporter.publish import export_bundle

    out = tmp_path_factory.mktemp("providers") / "tiny" / "1"
    export_bundle(trained_run / "best.pt", out)
    return out


def _settings(bundle: Path, **kw: object):
    return load_settings(bundle=bundle, port=0, intra_op_threads=1, **kw)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _serve_until_started(*args: str) -> list[str]:
    """Start `textgen serve` with ``args``, read its log until it serves, stop it; the log lines up to then."""
    proc = subprocess.Popen(
        [*TEXTGEN, "serve", "--port", "0", "--intra-op-threads", "1", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "textgen serving " in line:
                return lines
        raise AssertionError("textgen serve did not start:\n" + "".join(lines))
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def _serve_fails(*args: str) -> str:
    proc = subprocess.run(
        [*TEXTGEN, "serve", "--port", "0", *args], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


# -- the real server ---------------------------------------------------------------------------------------


@needs_no_gpu
def test_the_default_runs_on_the_cpu_without_asking_for_cuda(bundle: Path) -> None:
    log = "".join(_serve_until_started("--bundle", str(bundle)))
    assert ORT_CUDA_FAILURE not in log and "[E:onnxruntime" not in log
    assert "tiny:1 [CPUExecutionProvider]" in log


@needs_no_gpu
@needs_ort_cuda
def test_explicit_cuda_without_a_gpu_stops_the_server(bundle: Path) -> None:
    last = _serve_fails("--bundle", str(bundle), "--providers", f"{CUDA},{CPU}")
    assert last.startswith("textgen serve: error: providers (TEXTGEN_PROVIDERS): ")
    assert f"{CUDA} was asked for but is not active in the session, which runs on {CPU}" in last
    assert f"this ONNX Runtime build offers {', '.join(ort.get_available_providers())}" in last
    assert "--provider-fallback true" in last


@needs_no_gpu
@needs_ort_cuda
def test_with_fallback_it_starts_on_the_cpu_and_warns_once(bundle: Path) -> None:
    lines = _serve_until_started("--bundle", str(bundle), "--providers", f"{CUDA},{CPU}", "--provider-fallback", "true")
    warnings = [line for line in lines if "WARNING textgen.providers" in line]
    assert len(warnings) == 1 and f"{CUDA} was asked for" in warnings[0]
    assert f"provider_fallback: serving on {CPU}" in warnings[0]
    assert "tiny:1 [CPUExecutionProvider]" in lines[-1]


def test_a_misspelled_provider_fails_before_any_session(bundle: Path) -> None:
    last = _serve_fails("--bundle", str(bundle), "--providers", "CUDAExecutionProvidr,CPUExecutionProvider")
    assert "unknown execution provider 'CUDAExecutionProvidr' (did you mean CUDAExecutionProvider?)" in last
    # the name is checked before ONNX Runtime is asked for a session, so ONNX Runtime said nothing
    assert "EP Error" not in last


def test_a_misspelled_provider_is_refused_even_with_fallback(bundle: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"unknown execution provider 'cpuexecutionprovidr' \(did you mean CPUExecutionProvider\?\)"
    ):
        choose_providers(_settings(bundle, providers=["cpuexecutionprovidr"], provider_fallback=True))


def test_auto_stands_alone(bundle: Path) -> None:
    with pytest.raises(ConfigError, match="give auto alone"):
        _settings(bundle, providers="auto,CPUExecutionProvider")
    with pytest.raises(ConfigError, match="at least one execution provider"):
        _settings(bundle, providers="")


# -- the choice --------------------------------------------------------------------------------------------


def test_auto_chooses_cuda_only_where_a_gpu_is_present(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers_module, "nvidia_gpu_present", lambda: False)
    choice = choose_providers(_settings(bundle, cuda_graphs=True))
    assert choice.providers == (CPU,) and choice.ort_providers == [CPU]
    assert choice.device == "cpu" and not choice.cuda_graphs and not choice.required

    monkeypatch.setattr(providers_module, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    choice = choose_providers(_settings(bundle))
    assert choice.providers == (CUDA, CPU) and choice.device == "cuda" and not choice.required


def test_cuda_provider_options_come_from_the_settings(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    choice = choose_providers(
        _settings(bundle, providers=[CUDA, CPU], cuda_device_id=1, cuda_memory_limit_bytes=2 << 30, cuda_graphs=True)
    )
    options = {"device_id": "1", "gpu_mem_limit": str(2 << 30), "enable_cuda_graph": "1"}
    assert choice.ort_providers == [(CUDA, options), CPU]
    assert (choice.device, choice.device_id, choice.cuda_graphs, choice.required) == ("cuda", 1, True, (CUDA, CPU))
    plain = choose_providers(_settings(bundle, providers=[CUDA, CPU]))
    assert plain.ort_providers == [(CUDA, {"device_id": "0"}), CPU]  # no limit, no graphs unless asked
    assert not choose_providers(_settings(bundle, providers=[CPU], cuda_graphs=True)).cuda_graphs


def test_a_provider_not_in_this_build_is_refused_unless_falling_back(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])  # the onnxruntime (CPU) wheel
    with pytest.raises(ConfigError, match=f"{CUDA} is not in this ONNX Runtime build .*textgen\\[gpu\\]"):
        choose_providers(_settings(bundle, providers=[CUDA, CPU]))
    with caplog.at_level(logging.WARNING, logger="textgen.providers"):
        choice = choose_providers(_settings(bundle, providers=[CUDA, CPU], provider_fallback=True))
    assert choice.providers == (CPU,) and choice.device == "cpu"
    assert len(caplog.records) == 1 and "skipped (provider_fallback)" in caplog.records[0].getMessage()


def test_confirm_checks_what_the_session_really_runs_on(caplog: pytest.LogCaptureFixture) -> None:
    asked = ProviderChoice(providers=(CUDA, CPU), device="cuda", cuda_graphs=True, required=(CUDA, CPU))
    with pytest.raises(
        ConfigError, match=f"{CUDA} was asked for but is not active in the session, which runs on {CPU}"
    ):
        asked.confirm([CPU], Path("b/1"))
    confirmed = asked.confirm([CUDA, CPU], Path("b/1"))
    assert (confirmed.device, confirmed.cuda_graphs, confirmed.providers) == ("cuda", True, (CUDA, CPU))
    with caplog.at_level(logging.WARNING, logger="textgen.providers"):
        fallen = replace(asked, fallback=True).confirm([CPU], Path("b/1"))
    assert (fallen.device, fallen.cuda_graphs, fallen.providers) == ("cpu", False, (CPU,))
    assert len(caplog.records) == 1


def test_int8_is_refused_on_cuda_and_auto_runs_it_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    explicit = ProviderChoice(providers=(CUDA, CPU), device="cuda", required=(CUDA, CPU))
    with pytest.raises(BundleError, match=r"b/1: an int8 bundle cannot run on CUDAExecutionProvider.*fp16.*CPU"):
        explicit.for_precision("int8", Path("b/1"))
    for precision in ("fp32", "fp16"):
        assert explicit.for_precision(precision, Path("b/1")) is explicit
    auto = ProviderChoice(providers=(CUDA, CPU), device="cuda")
    with caplog.at_level(logging.WARNING, logger="textgen.providers"):
        assert auto.for_precision("int8", Path("b/1")) == cpu_only()
    assert "int8 bundle, whose kernels are CPU-only" in caplog.records[0].getMessage()
    assert cpu_only().for_precision("int8", Path("b/1")) == cpu_only()


def test_the_loaded_bundle_reports_its_execution(bundle: Path) -> None:
    from service.models import ModelRegistry

    (model,) = ModelRegistry.load(_settings(bundle, providers=[CPU]))
    assert model.bundle.execution.providers == (CPU,) and model.bundle.execution.device == "cpu"


def test_gpu_detection_looks_for_nvidia_device_nodes(tmp_path: Path) -> None:
    detect = nvidia_gpu_present.__wrapped__  # uncached
    assert not detect(tmp_path)
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-caps"):  # present without any GPU granted
        (tmp_path / name).touch()
    assert not detect(tmp_path)
    (tmp_path / "nvidia0").touch()
    assert detect(tmp_path)
    assert not detect(tmp_path / "missing")
