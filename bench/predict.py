"""``textgen bench predict``: Predict's latency as a keyboard uses it. A keyboard (Hard et al. 2018) shows three
suggestions and must show them within about 20 ms of a key press, so each call here is one keystroke: the text
typed since the last call (one character for a character model, one word and its space for a word model) with the
snapshot the last call returned, ``num_predictions`` 3, ``return_snapshot`` set. Calls go one after another over
loopback to a ``textgen serve`` process of each checkpoint (fp32, CPU); per call it reports the latency the client
sees (p50, p99, mean) and the server's CPU time (user + system from /proc, all its threads)."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.load import ServerProcess, process_cpu_seconds
from bench.serve import export_bundles, machine
from textgen.client import Client

# Typed over and over; a character model's unknown characters are mapped to <unk> (the server runs with
# --unknown-tokens map), a word model's unknown words too.
TEXT = (
    "the company said it expects to report a loss for the third quarter because of the costs of the new plant "
    "and that its sales will rise next year as the market for its products grows again "
)
WARM_UP_CALLS = 20


def _keystrokes(level: str, calls: int) -> list[str]:
    units = list(TEXT) if level == "char" else [w + " " for w in TEXT.split()]
    return [units[i % len(units)] for i in range(calls)]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_one(bundle: Path, calls: int, threads: int) -> dict[str, Any]:
    level = json.loads((bundle / "manifest.json").read_text())["tokenizer"]["level"]
    server = ServerProcess(bundle, threads, 64, 256, extra=("--unknown-tokens", "map"))
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
            snapshot = b""
            keys = _keystrokes(level, WARM_UP_CALLS + calls)
            latencies, depth = [], []
            cpu_start = 0.0
            for i, key in enumerate(keys):
                if i == WARM_UP_CALLS:
                    cpu_start = process_cpu_seconds(server.proc.pid) or 0.0
                start = time.perf_counter()
                reply = client.predict(key, num_predictions=3, snapshot=snapshot, return_snapshot=True)
                seconds = time.perf_counter() - start
                snapshot = reply.snapshot
                if i >= WARM_UP_CALLS:
                    latencies.append(seconds * 1000)
                    depth.append(max((len(p.token_ids) for p in reply.predictions), default=0))
            cpu = (process_cpu_seconds(server.proc.pid) or 0.0) - cpu_start
            example = [p.text for p in reply.predictions]
    finally:
        server.stop()
    return {
        "bundle": str(bundle),
        "level": level,
        "calls": calls,
        "p50_ms": _percentile(latencies, 0.5),
        "p99_ms": _percentile(latencies, 0.99),
        "mean_ms": statistics.fmean(latencies),
        "max_ms": max(latencies),
        "server_cpu_ms_per_call": cpu * 1000 / calls,
        "mean_longest_prediction_tokens": statistics.fmean(depth),
        "last_predictions": example,
    }


def run_predict_bench(checkpoints: list[Path], out: Path, calls: int, threads: int) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    results = []
    for checkpoint in checkpoints:
        bundle = export_bundles(checkpoint, out / "bundles", ["fp32"])["fp32"]
        result = {"checkpoint": str(checkpoint), **bench_one(bundle, calls, threads)}
        results.append(result)
        print(
            f"{checkpoint} ({result['level']}): p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
            f"mean {result['mean_ms']:.2f} ms per call; server CPU {result['server_cpu_ms_per_call']:.2f} ms "
            f"per call ({calls} calls; e.g. {result['last_predictions']})",
            flush=True,
        )
    report = {
        "machine": machine(),
        "threads": threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "results": results,
    }
    (out / "predict.json").write_text(json.dumps(report, indent=1))
    print(f"load average before {load_before[0]:.2f}, after {report['load_average_after'][0]:.2f}", flush=True)
    return report
