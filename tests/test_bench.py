"""The benchmark programs run end to end on a tiny checkpoint (behaviour only: what they write and that their
comparisons are like for like; their figures come from real runs, recorded in docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from textgen.cli import main


def test_bench_serve_writes_every_comparison_and_the_plots(trained_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "serve"
    argv = ["bench", "serve", str(trained_run / "best.pt"), "--concurrency", "1,3", "--max-tokens", "12",
            "--threads", "1", "--eager-requests", "1", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "serve.json").read_text())
    assert report["torch_eager"]["tokens"] == 12
    rows = report["precisions"]["fp32"]
    assert [r["concurrency"] for r in rows] == [1, 3]
    for row in rows:
        assert row["server"]["tokens"] == 12 * row["concurrency"]  # every stream got all its tokens
        assert row["server_batch1"]["tokens"] == 12 * row["concurrency"]
        assert row["raw"]["batch"] == row["concurrency"]
        for key in ("vs_raw", "vs_batch1", "vs_torch_eager"):
            assert row[key] > 0
        assert row["raw"]["cpu_ms_per_token"] > 0 and row["server"]["client_cpu_ms_per_token"] > 0
        assert row["server"]["server_cpu_ms_per_token"] >= 0  # read from /proc in 10 ms ticks: may round to 0
    assert "itl_p50_vs_raw_step" in rows[0]
    assert (out / "serve-throughput-fp32.png").stat().st_size > 0
    assert (out / "serve-latency-fp32.png").stat().st_size > 0


def test_bench_quality_scores_the_bundle_as_the_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    from bench.quality import run_quality_bench

    report = run_quality_bench(trained_run / "best.pt", tmp_path / "quality", "valid", 300, ["fp32", "int8"])
    assert report["tokens"] > 100
    assert abs(report["fp32"]["delta_vs_torch"]) < 1e-4  # the served fp32 bundle is the checkpoint
    assert abs(report["int8"]["delta_vs_torch"]) < 0.1
    assert json.loads((tmp_path / "quality" / "quality.json").read_text())["fp32"] == report["fp32"]


def test_minimal_training_loop_trains_the_checkpoints_model(trained_run: Path) -> None:
    from bench.train import minimal_loop

    speed = minimal_loop(trained_run / "last.pt", steps=3)
    assert speed.tokens == 3 * 4 * 32  # the run's batch size and BPTT window
    assert speed.tokens_per_s > 0


def test_bench_curves_plots_runs_and_names_a_directory_that_is_not_a_run(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots" / "curves.png"
    assert main(["bench", "curves", str(trained_run), str(trained_run), "--labels", "a,b", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    capsys.readouterr()
    assert main(["bench", "curves", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}: no metrics.jsonl" in err
    assert not (tmp_path / "x.png").exists()


def test_bench_soak_mixed_load_ends_clean(trained_run: Path, tmp_path: Path) -> None:
    """A few seconds of the soak on the tiny model: every kind of call is made, none ends in INTERNAL, bad requests
    get their documented status, and the slot, queue and session gauges come back to zero (behaviour, not rates)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "soak"
    argv = ["bench", "soak", str(trained_run / "best.pt"), "--seconds", "3", "--clients", "2", "--sample-every",
            "0.5", "--session-ttl", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "soak.json").read_text())
    assert report["passed"] and report["failures"] == []
    assert report["internal"] == 0 and report["server_internal"] == 0
    assert set(report["server_errors"]) == {"count", "first"} and (out / "server.log").stat().st_size > 0
    for method in ("Generate", "GenerateStream", "Score", "CreateSession", "ForkSession", "CloseSession"):
        assert report["requests"][method].get("OK", 0) > 0, method
    assert report["requests"]["GenerateStream"].get("CANCELLED", 0) > 0  # cancelled after a few of 4,000 tokens
    assert len(report["bad_requests"]) == 13 and report["bad_requests_unexpected"] == {}
    assert report["server_requests"]["Generate"].get("INVALID_ARGUMENT", 0) > 0  # the server counted them too
    assert report["tokens_generated"] > 0
    assert all(report["gauges_end"][k] == 0 for k in ("running", "queue", "sessions"))
    assert report["gauges_end"]["paused"] in (0, None)  # None: a server without the gauge
    assert report["drain_seconds"] is not None and report["sessions"]["zero_after_seconds"] is not None
    for key in ("rss_mib", "threads", "fds"):
        assert {"start", "end", "max"} <= set(report[key]) and report[key]["max"] >= report[key]["start"] > 0
    assert "slope_mib_per_min_second_half" in report["rss_mib"]
    assert len(report["samples"]) >= 3 and (out / "soak.png").stat().st_size > 0
