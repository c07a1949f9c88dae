"""``textgen bench replicas``: scale-out figures on one machine.

- Throughput: 1, 2 and 3 ``textgen serve`` replicas of one bundle, driven by one client balancing its C streams
  over them with gRPC's round_robin (the sampling mix of ``bench.load``). Every replica count runs once per round,
  in alternating order, for ``rounds`` rounds; the median run of each is kept. On a machine with fewer cores than
  replicas x (engine + ONNX Runtime threads) there is nothing to gain: the figures show what the split costs.
- Failover cost: three replicas, one failover client (``textgen.client.Client(failover=True)``) reading a seeded
  stream; after ``kill_after`` messages the replica generating it is SIGKILLed. Reported per trial: the time from
  the kill to the next message the client receives, beside the stream's ordinary gap between messages, and
  whether the text equals the uninterrupted text (it must). The killed replica is restarted between trials."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import statistics
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.load import MIX, LoadResult, ServerProcess, drive, requests
from textgen.client import Client

PROMPT = ""  # from the start token: every vocabulary has it
# The failover stream cannot end while the client stops reading to kill its replica, on any machine: each replica
# buffers at most 8 unsent tokens and the client's flow-control window stays at ~1 KB (tokens are >= 1 byte).
HELD = ("--stream-buffer-tokens", "8")
SMALL_WINDOW = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024))


def _serving(replica: ServerProcess) -> bool:
    with urllib.request.urlopen(replica.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    names = ("textgen_running_sequences", "textgen_paused_sequences")
    return any(s.value for f in text_string_to_metric_families(text) if f.name in names for s in f.samples)


def _start(bundle: Path, threads: int, concurrency: int, max_tokens: int, *extra: str) -> ServerProcess:
    return ServerProcess(bundle, threads, concurrency, max_tokens, extra=("--metrics-port", "0", *extra))


def replica_threads(threads: int, replicas: int) -> int:
    """ONNX Runtime threads of each of ``replicas`` replicas: ``threads``, or (0) an equal share of the cores, so
    one replica uses the whole machine as N replicas do together."""
    return threads or max(1, (os.cpu_count() or 1) // replicas)


def throughput(
    bundle: Path, counts: list[int], concurrency: int, max_tokens: int, rounds: int, threads: int
) -> dict[int, LoadResult]:
    pools: dict[int, list[ServerProcess]] = {}  # by threads: the replicas of every count that uses that many
    for n in counts:
        k = replica_threads(threads, n)
        pool = pools.setdefault(k, [])
        pool.extend(_start(bundle, k, concurrency, max_tokens) for _ in range(n - len(pool)))
    runs: dict[int, list[LoadResult]] = {n: [] for n in counts}
    try:
        for r in range(rounds):
            for n in counts if r % 2 == 0 else list(reversed(counts)):
                servers = pools[replica_threads(threads, n)][:n]
                target = ",".join(f"127.0.0.1:{s.port}" for s in servers)
                batch = requests(MIX, concurrency, max_tokens)
                result = asyncio.run(drive(target, batch, [s.proc.pid for s in servers]))
                runs[n].append(result)
                print(f"  round {r + 1}: {n} replica(s), C={concurrency}: {result.tokens_per_s:,.0f} tok/s", flush=True)
    finally:
        for pool in pools.values():
            for s in pool:
                s.stop()
    return {n: sorted(rs, key=lambda x: x.tokens_per_s)[len(rs) // 2] for n, rs in runs.items()}


def _trial(replicas: list[ServerProcess], request: dict[str, Any], kill_after: int) -> dict[str, Any]:
    target = ",".join(f"127.0.0.1:{s.port}" for s in replicas)
    with Client(f"127.0.0.1:{replicas[0].port}", timeout=120) as direct:
        expected = direct.generate(PROMPT, **request).text
    stamps: list[float] = []
    parts: list[str] = []
    killed_at, victim, resumed = 0.0, -1, -1
    with Client(target, timeout=120, failover=True, options=SMALL_WINDOW) as client:
        for msg in client.stream(PROMPT, return_token_ids=True, **request):  # the version marks a resumed call
            stamps.append(time.perf_counter())
            parts.append(msg.text)
            if killed_at and resumed < 0 and msg.model_version:  # a stream's first message names the version
                resumed = len(stamps) - 1  # the resumed stream's first message
            if len(stamps) == kill_after:
                victim = next(i for i, r in enumerate(replicas) if _serving(r))
                killed_at = time.perf_counter()
                os.kill(replicas[victim].proc.pid, signal.SIGKILL)
    replicas[victim].proc.wait()
    gaps = [b - a for a, b in itertools.pairwise(stamps[:kill_after])]
    return {
        "kill_to_next_message_ms": (stamps[resumed] - killed_at) * 1e3,
        "messages_after_kill_before_resume": resumed - kill_after,  # already on their way when it was killed
        "gap_p50_before_ms": statistics.median(gaps) * 1e3,
        "exact": "".join(parts) == expected,
        "victim": victim,
    }


def failover_cost(bundle: Path, trials: int, max_tokens: int, kill_after: int, threads: int) -> list[dict[str, Any]]:
    threads = replica_threads(threads, 3)
    replicas = [_start(bundle, threads, 8, max_tokens, *HELD) for _ in range(3)]
    request = {"max_tokens": max_tokens, "temperature": 0.9, "top_k": 40, "seed": 0}
    out = []
    try:
        for t in range(trials):
            request["seed"] = t
            result = _trial(replicas, request, kill_after)
            out.append(result)
            print(
                f"  trial {t + 1}: kill -> next message {result['kill_to_next_message_ms']:.1f} ms "
                f"(ordinary gap p50 {result['gap_p50_before_ms']:.2f} ms), exact={result['exact']}",
                flush=True,
            )
            replicas[result["victim"]].stop()
            replicas[result["victim"]] = _start(bundle, threads, 8, max_tokens, *HELD)
    finally:
        for r in replicas:
            r.stop()
    return out


def run_replicas_bench(
    bundle: Path,
    out: Path,
    counts: list[int],
    concurrency: int,
    max_tokens: int,
    rounds: int,
    threads: int,
    trials: int,
    failover_tokens: int,
    kill_after: int,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    print(f"throughput: {counts} replicas, C={concurrency}, {max_tokens} tokens a stream, {rounds} rounds")
    best = throughput(bundle, counts, concurrency, max_tokens, rounds, threads)
    cost = []
    if trials:
        print(f"failover: {trials} trials, kill after {kill_after} messages of {failover_tokens} tokens")
        cost = failover_cost(bundle, trials, failover_tokens, kill_after, threads)
    base = best[min(counts)].tokens_per_s
    report = {
        "bundle": str(bundle),
        "cpus": os.cpu_count(),
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "threads_per_replica": {str(n): replica_threads(threads, n) for n in counts},
        "throughput": {str(n): {**asdict(r), "ratio_to_one": r.tokens_per_s / base} for n, r in best.items()},
        "failover": cost
        and {
            "trials": cost,
            "kill_to_next_message_ms_p50": statistics.median(c["kill_to_next_message_ms"] for c in cost),
            "kill_to_next_message_ms_max": max(c["kill_to_next_message_ms"] for c in cost),
            "gap_p50_before_ms": statistics.median(c["gap_p50_before_ms"] for c in cost),
            "all_exact": all(c["exact"] for c in cost),
        },
    }
    (out / "replicas.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n| replicas | tok/s | vs 1 | server CPU ms/token | client CPU ms/token | gap p50 / p99 ms | TTFT p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for n, r in best.items():
        print(
            f"| {n} | {r.tokens_per_s:,.0f} | {r.tokens_per_s / base:.2f} | {r.server_cpu_ms_per_token:.3f} | "
            f"{r.client_cpu_ms_per_token:.3f} | {r.gap_p50_ms:.1f} / {r.gap_p99_ms:.1f} | {r.ttft_p50_ms:.1f} |"
        )
    f = report["failover"]
    if not f:
        return report
    print(
        f"\nfailover: kill -> next message p50 {f['kill_to_next_message_ms_p50']:.1f} ms, max "
        f"{f['kill_to_next_message_ms_max']:.1f} ms (ordinary gap p50 {f['gap_p50_before_ms']:.2f} ms); "
        f"text exact in every trial: {f['all_exact']}"
    )
    return report
