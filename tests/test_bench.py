"""The benchmark programs run end to end on a tiny checkpoint (behaviour only: what they write and that their
comparisons are like for like; their figures come from real runs, recorded in docs/benchmarks.md)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from textgen.cli import main


def test_bench_serve_writes_every_comparison_and_the_plots(trained_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.serve import CPU_CONFIGS

    out = tmp_path / "serve"
    argv = ["bench", "serve", str(trained_run / "best.pt"), "--concurrency", "1,2", "--max-tokens", "12",
            "--threads", "1", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "serve.json").read_text())
    assert report["configs"] == list(CPU_CONFIGS) and report["sampling"] == "mix"
    rows = report["precisions"]["fp32"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert rows[0]["settings"] == {"temperature": 1} and rows[1]["settings"] == {"temperature": 1, "top_k": 1}
    for row in rows:
        c, res = row["concurrency"], row["results"]
        assert set(res) == set(CPU_CONFIGS) and all(len(runs) == 1 for runs in row["runs"].values())
        for server in ("server", "server_batch1"):
            assert res[server]["tokens"] == 12 * c  # every stream got all its tokens
            assert res[server]["ttft_p50_ms"] > 0
            # A stream whose client fell behind (a loaded machine) gets its text in one message: no gaps, zeros.
            for key in ("gap_p50_ms", "gap_p99_ms", "itl_p50_ms", "stream_ms_per_token"):
                assert res[server][key] >= 0, key
            assert res[server]["messages_per_stream"] >= 1 and res[server]["client_cpu_ms_per_token"] > 0
            assert res[server]["server_cpu_ms_per_token"] >= 0  # read from /proc in 10 ms ticks: may round to 0
        for base in ("raw", "raw_iobinding", "torch_eager"):
            assert (res[base]["batch"], res[base]["tokens"]) == (c, 12 * c)  # the same work as the streams
            assert res[base]["cpu_ms_per_token"] > 0 and res[base]["step_ms"] > 0
        assert (res["raw"]["loop"], res["raw_iobinding"]["loop"]) == ("graph", "iobinding")
        assert res["raw_iobinding"]["device"] == "cpu" and not res["raw_iobinding"]["cuda_graphs"]
        for key in ("server_vs_raw", "server_vs_raw_iobinding", "server_vs_server_batch1", "server_vs_torch_eager"):
            assert row["ratios"][key] > 0
        assert "server_cpu_vs_raw_cpu" in row["ratios"]
    assert rows[0]["ratios"]["server_gap_p50_vs_raw_step"] >= 0
    assert (out / "serve-throughput-fp32.png").stat().st_size > 0
    assert (out / "serve-latency-fp32.png").stat().st_size > 0


def test_the_raw_loops_sample_each_row_as_the_server_samples_its_stream(
    served_bundle: Path, serve: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row i of a raw loop has exactly the parameters the server derives from client i's request (after the wire's
    float32 rounding), a generator seeded i and the seen-token mask the penalty needs: both raw loops draw the
    very tokens the server streams to the clients, so they do the same work."""
    from bench import baselines
    from bench.load import requests, row_params
    from service.bundle import load_bundle
    from service.messages import spec_of
    from service.models import ModelRegistry
    from service.settings import load_settings
    from service.validation import sampling_params
    from textgen.sampling import new_rng
    from textgen.v1 import textgen_pb2 as pb

    streams, steps = 6, 12
    sent = [pb.GenerateRequest.FromString(r.SerializeToString()) for r in requests("mix", streams, steps)]
    live = serve(intra_op_threads=1)
    server_params = [sampling_params(spec_of(r), live.server.app.settings) for r in sent]
    assert [r.seed for r in sent] == list(range(streams))
    assert len(set(server_params)) == 4 and server_params[4:] == server_params[:2]  # stream i: setting i % 4
    assert row_params("mix", streams) == server_params
    texts = [live.stub.Generate(r).text for r in sent]

    calls: list[tuple[list[Any], list[Any], Any, Any]] = []
    real = baselines.sample_batch

    def spy(logits: Any, params: Any, rngs: Any, seen: Any = None) -> Any:
        states = [r.bit_generator.state["state"] for r in rngs]
        tokens = real(logits, params, rngs, seen)
        calls.append((list(params), states, None if seen is None else seen.copy(), tokens))
        return tokens

    monkeypatch.setattr(baselines, "sample_batch", spy)
    settings = load_settings(bundle=served_bundle, port=0, providers=["CPUExecutionProvider"], intra_op_threads=1)
    model = next(iter(ModelRegistry.load(settings)))
    for run in (
        lambda: baselines.raw_graph_loop(load_bundle(served_bundle), row_params("mix", streams), steps),
        lambda: baselines.raw_iobinding_loop(model, model.batch_state(8), row_params("mix", streams), steps),
    ):
        calls.clear()
        assert run().tokens == streams * steps
        measured = calls[baselines.WARM_UP_STEPS :]  # after the warm-up, the loop starts over from the start token
        assert len(measured) == steps
        params, states, seen, _ = measured[0]
        assert params == server_params
        assert states == [new_rng(i).bit_generator.state["state"] for i in range(streams)]
        assert seen is not None and seen.dtype == bool and seen.shape == (streams, model.vocab_size)
        assert seen.sum(axis=1).tolist() == [1] * streams and seen[:, model.tokenizer.start_id].all()
        for before, after in itertools.pairwise(measured):  # every sampled token is seen from the next step on
            expected = before[2].copy()
            expected[range(streams), before[3]] = True
            assert np.array_equal(after[2], expected)
        drawn = np.array([c[3] for c in measured]).T
        assert [model.tokenizer.decode(row.tolist()) for row in drawn] == texts


def test_bench_serve_on_cuda_without_a_gpu_says_so(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.providers import nvidia_gpu_present

    if nvidia_gpu_present():
        pytest.skip("a GPU is present: --device cuda would run")
    argv = ["bench", "serve", str(trained_run / "best.pt"), "--device", "cuda", "--out", str(tmp_path / "cuda")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--device cuda" in err and err.count("\n") == 1
    assert not (tmp_path / "cuda").exists()  # refused before any export


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


def test_bench_replicas_measures_throughput_and_an_exact_failover(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "replicas"
    argv = ["bench", "replicas", str(trained_run / "best.pt"), "--replicas", "1,2", "--concurrency", "2",
            "--max-tokens", "8", "--repeats", "1", "--trials", "1", "--failover-tokens", "600", "--kill-after", "3",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "replicas.json").read_text())
    assert set(report["throughput"]) == {"1", "2"} and report["throughput"]["1"]["ratio_to_one"] == 1.0
    assert all(r["tokens"] == 16 for r in report["throughput"].values())
    (trial,) = report["failover"]["trials"]
    assert trial["exact"] and trial["kill_to_next_message_ms"] > 0


def test_bench_serve_http_runs_both_transports_on_the_same_work(trained_run: Path, tmp_path: Path) -> None:
    """``--http``: one server serving gRPC and the HTTP API, both driven with the same streams; every stream of
    every run got its tokens, and the texts of each seed are the same over both transports (the bench's own
    cross-check: it exits 1 otherwise)."""
    pytest.importorskip("aiohttp")
    out = tmp_path / "http"
    argv = ["bench", "serve", str(trained_run / "best.pt"), "--http", "--concurrency", "1,3", "--max-tokens", "12",
            "--threads", "1", "--repeats", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "serve-http.json").read_text())
    assert report["transports"] == ["grpc", "http"] and report["repeats"] == 2 and report["http_server"]
    rows = report["precisions"]["fp32"]
    assert [r["concurrency"] for r in rows] == [1, 3]
    for row in rows:
        c = row["concurrency"]
        assert row["texts_match"] and row["mismatched_seeds"] == []
        assert {t: len(runs) for t, runs in row["runs"].items()} == {"grpc": 2, "http": 2}
        for transport in ("grpc", "http"):
            res = row["results"][transport]
            assert res["tokens"] == 12 * c and res["concurrency"] == c
            assert res["ttft_p50_ms"] > 0 and res["messages_per_stream"] >= 1
            assert res["client_cpu_ms_per_token"] > 0 and res["server_cpu_ms_per_token"] >= 0
        assert row["ratios"]["http_vs_grpc_tokens_per_s"] > 0


def test_the_bench_reads_server_sent_events_as_the_format_defines_them() -> None:
    from bench.sse import EventParser

    parser = EventParser()
    stream = b': a comment\r\ndata: {"a": 1}\r\n\r\ndata:two\ndata:  lines\nid: 7\n\nevent: x\n\ndata: [DONE]\n\n'
    events = [e for i in range(0, len(stream), 5) for e in parser.feed(stream[i : i + 5])]  # cut anywhere
    assert events == ['{"a": 1}', "two\n lines", "[DONE]"]
