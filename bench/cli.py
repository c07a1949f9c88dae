"""``textgen bench serve|train|quality|curves|soak|sampling|replicas|predict``: the benchmark programs. Each writes
JSON (and plots) into ``--out`` and prints its figures; docs/benchmarks.md states them with the command that made
them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _command(
    sub: Any, name: str, handler: Any, out: str, help: str, description: str, out_help: str = "results directory"
) -> argparse.ArgumentParser:
    """One ``textgen bench`` program: its parser, its ``--out`` and its handler (the parts every program has)."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--out", type=Path, default=Path(out), help=f"{out_help} (default: %(default)s)")
    p.set_defaults(handler=handler)
    return p


def register(commands: Any) -> None:
    p = commands.add_parser("bench", help="benchmarks: serving, training speed, bundle quality, soak, sampling")
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)

    serve = _command(
        sub,
        "serve",
        _serve,
        "bench-results/serve",
        help="a real server under C concurrent streams vs raw decode loops, batch-1 serving and batched torch eager",
        description="Exports CHECKPOINT to one bundle per precision, starts `textgen serve` on it and drives it "
        "with C concurrent streaming clients using a mix of sampling settings (stream i: temperature 1; + top_k "
        "40; + top_p 0.9; + repetition penalty 1.3, by i % 4). In the same run, with the same per-stream "
        "settings and seeds, it measures the raw decode loops at batch C (the exported graph with numpy feeds; "
        "the service's step graph over device-resident state with IOBinding, and on --device cuda with CUDA "
        "graphs too), the server with --max-batch-size 1, and a PyTorch eager loop batched at C. Each C runs "
        "every configuration once per round for --repeats rounds and keeps each one's median run. Writes "
        "serve.json and PNG plots into --out and prints a table per precision.",
    )
    serve.add_argument("checkpoint", type=Path)
    serve.add_argument(
        "--concurrency", type=_ints, default=None, help="C values (default: 1,8,32,64,128; on cuda also 256)"
    )
    serve.add_argument("--max-tokens", type=int, default=256, help="sampled tokens per stream (default: %(default)s)")
    serve.add_argument("--precisions", type=_names, default=["fp32"], help="fp32,int8,fp16 (default: fp32)")
    serve.add_argument("--threads", type=int, default=0, help="ONNX Runtime / torch threads (0: one per core)")
    serve.add_argument(
        "--repeats", type=int, default=3, help="rounds per C, every configuration once each; medians kept"
    )
    serve.add_argument(
        "--sampling",
        choices=["mix", "temperature", "top_k", "top_p", "penalty"],
        default="mix",
        help="every stream's sampling setting, or mix: stream i uses the i %% 4-th (default: mix)",
    )
    serve.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: the server and raw loops on CUDAExecutionProvider, with CUDA graphs on and off, and torch "
        "eager on the GPU; fails at once without a GPU (default: cpu)",
    )
    serve.add_argument(
        "--configs",
        type=_names,
        default=None,
        help="measure only these, e.g. raw,server (default: all: raw,raw_iobinding,server,server_batch1,"
        "torch_eager; on cuda also raw_iobinding_graphs,server_graphs)",
    )
    serve.add_argument(
        "--max-stream-interval", type=int, default=None, help="the server's setting (default: the server's default)"
    )
    serve.add_argument(
        "--http",
        action="store_true",
        help="instead: the OpenAI-compatible HTTP API (streamed, server-sent events) vs gRPC on one server "
        "serving both, the same streams over each, alternated per round; writes serve-http.json (default C: 1,64)",
    )

    train = _command(
        sub,
        "train",
        _train,
        "bench-results/train",
        help="`textgen train` tokens/s vs a minimal hand-written PyTorch loop on the same model and data",
        description="For each preset, runs `textgen train` and a minimal PyTorch loop alternately, twice each, "
        "for --steps steps, and reports the best tokens/s of each and their ratio. Writes train.json into --out.",
    )
    train.add_argument("--data-root", type=Path, required=True, help="holds tinyshakespeare/input.txt and ptb/")
    train.add_argument("--presets", type=_names, default=["char-2x512", "word-2x200"])
    train.add_argument("--steps", type=int, default=60, help="optimizer steps per measurement (default: 60)")
    train.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")

    quality = _command(
        sub,
        "quality",
        _quality,
        "bench-results/quality",
        help="a checkpoint's loss vs its fp32 and int8 bundles scored through a real server",
        description="Scores the start of the checkpoint's validation (or test) split with the torch model and "
        "through `Score` on a server serving its exported bundles. Writes quality.json into --out.",
    )
    quality.add_argument("checkpoint", type=Path)
    quality.add_argument("--split", choices=["valid", "test"], default="valid")
    quality.add_argument("--tokens", type=int, default=50_000, help="tokens of the split to score")
    quality.add_argument("--precisions", type=_names, default=["fp32", "int8"])
    quality.add_argument(
        "--block",
        type=int,
        default=0,
        help="also the loss over independent N-token windows of the whole split, "
        "each from a zero state (nanoGPT's protocol: 256 for its char models); 0: skip",
    )

    curves = _command(
        sub,
        "curves",
        _curves,
        "bench-results/curves.png",
        help="training and validation loss curves of one or more runs, as a PNG",
        description="Plots train and validation loss against step from each RUN_DIR's metrics.jsonl, one colour "
        "per run, into one PNG.",
        out_help="the PNG to write",
    )
    curves.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    curves.add_argument("--labels", type=_names, default=None, help="one name per run (default: directory names)")
    curves.add_argument("--title", default="training curves")

    soak = _command(
        sub,
        "soak",
        _soak,
        "bench-results/soak",
        help="a real server under minutes of mixed load: leaks, INTERNAL answers, gauges back to zero",
        description="Starts `textgen serve` on CHECKPOINT's fp32 bundle (or --bundle) and drives it for --minutes "
        "with --clients threads of mixed work: streams, unary calls, scores, sessions and forks, snapshots, client "
        "cancels, short deadlines and bad requests. Samples the server's RSS, threads, open fds, CPU time and "
        "/metrics gauges; at the end checks that running/queued sequences and sessions return to zero. Writes "
        "soak.json and soak.png into --out; exits 1 on any INTERNAL answer, gauges not back to zero, or a dead server.",
    )
    soak.add_argument("checkpoint", type=Path, nargs="?", help="exported to an fp32 bundle (or give --bundle)")
    soak.add_argument("--bundle", type=Path, default=None, help="serve this bundle directory instead")
    soak.add_argument("--minutes", type=float, default=10.0, help="load duration (default: %(default)s)")
    soak.add_argument("--seconds", type=float, default=None, help="load duration in seconds; overrides --minutes")
    soak.add_argument("--clients", type=int, default=8, help="client threads (default: %(default)s)")
    soak.add_argument("--threads", type=int, default=0, help="the server's ONNX Runtime threads (0: one per core)")
    soak.add_argument(
        "--session-ttl", type=float, default=60.0, help="the server's --session-ttl-seconds (default: %(default)s)"
    )
    soak.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default: 5)")

    sampling = _command(
        sub,
        "sampling",
        _sampling,
        "bench-results/sampling",
        help="the sampler (textgen.sampling.sample_batch) vs a plain per-row implementation of the same rule",
        description="Times sample_batch against bench/sampling.py's per-row reference implementation of the "
        "same rule on 1x96, 64x96, 1x10000 and 64x10000 logits, N(0, 3^2) and peaked (every other row led by one "
        "token), for temperature 1, top_k 40, top_p 0.9, repetition penalty 1.3 (about 50 seen tokens a row), "
        "min_p 0.05, presence and frequency penalties 0.5, logit_bias on 300 tokens, half the vocabulary allowed "
        "and 50 tokens banned. "
        "The two alternate call by call after a warm-up; prints the median ms of each and their ratio, and "
        "writes sampling.json into --out. About 20 s.",
    )
    sampling.add_argument(
        "--seconds", type=float, default=0.25, help="time per measurement of both (default: %(default)s)"
    )

    replicas = _command(
        sub,
        "replicas",
        _replicas,
        "bench-results/replicas",
        help="scale-out on this machine: throughput of 1, 2, 3 replicas (round_robin) and the cost of a failover",
        description="Exports CHECKPOINT (fp32) and starts up to 3 `textgen serve` replicas of it, each with an "
        "equal share of the cores as ONNX Runtime threads (--threads overrides). Throughput: one client balances C "
        "streams (the sampling mix of `bench serve`) over N replicas with round_robin, for each N once per round, "
        "in alternating order, median of --repeats rounds; with the replicas' and the client's CPU time per "
        "token. Failover: a failover client reads a seeded stream from 3 replicas, the replica generating it is "
        "SIGKILLed after --kill-after messages; the time from the kill to the resumed stream's first message, and "
        "whether the text equals the uninterrupted text. Writes replicas.json into --out.",
    )
    replicas.add_argument("checkpoint", type=Path)
    replicas.add_argument("--replicas", type=_ints, default=[1, 2, 3], help="replica counts (default: 1,2,3)")
    replicas.add_argument("--concurrency", type=int, default=64, help="streams at once (default: %(default)s)")
    replicas.add_argument("--max-tokens", type=int, default=256, help="tokens a stream (default: %(default)s)")
    replicas.add_argument("--repeats", type=int, default=3, help="rounds (default: %(default)s)")
    replicas.add_argument(
        "--threads", type=int, default=0, help="each replica's ONNX Runtime threads (0: the cores shared out equally)"
    )
    replicas.add_argument("--trials", type=int, default=10, help="failover trials (default: %(default)s)")
    replicas.add_argument("--failover-tokens", type=int, default=2000, help="tokens of a failover stream")
    replicas.add_argument("--kill-after", type=int, default=50, help="messages read before the kill (default: 50)")

    predict = _command(
        sub,
        "predict",
        _predict,
        "bench-results/predict",
        help="Predict's latency per keystroke, as a keyboard calls it (p50/p99, server CPU per call)",
        description="Exports each CHECKPOINT (fp32) and starts `textgen serve` on it (--unknown-tokens map); one "
        "client types a fixed English text into Predict one keystroke a call (a character for a character model, "
        "a word and its space for a word model), each call with the snapshot the previous one returned, three "
        "predictions, return_snapshot set. After 20 warm-up calls it times --calls calls one after another: "
        "latency p50, p99 and mean, and the server's CPU time per call. Writes predict.json into --out.",
    )
    predict.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT")
    predict.add_argument("--calls", type=int, default=500, help="timed calls per checkpoint (default: %(default)s)")
    predict.add_argument("--threads", type=int, default=0, help="the server's ONNX Runtime threads (0: one per core)")


def _predict(args: argparse.Namespace) -> int:
    from bench.predict import run_predict_bench

    run_predict_bench(args.checkpoints, args.out, args.calls, args.threads)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from bench.serve import run_serve_bench

    shared: dict[str, Any] = {  # the same work, whichever of the two benches measures it
        "max_tokens": args.max_tokens,
        "precisions": args.precisions,
        "threads": args.threads,
        "repeats": args.repeats,
        "sampling": args.sampling,
        "device": args.device,
        "stream_interval": args.max_stream_interval,
    }
    if args.http:
        from bench.transports import run_http_bench

        if args.configs is not None:
            from textgen.errors import ConfigError

            raise ConfigError("--configs: not with --http (it measures the one server over both transports)")
        report = run_http_bench(args.checkpoint, args.out, args.concurrency or [1, 64], **shared)
        rows = [row for rows in report["precisions"].values() for row in rows]
        return 0 if all(row["texts_match"] for row in rows) else 1  # the transports did not do the same work
    default = [1, 8, 32, 64, 128] + ([256] if args.device == "cuda" else [])
    run_serve_bench(args.checkpoint, args.out, args.concurrency or default, **shared, configs=args.configs)
    return 0


def _train(args: argparse.Namespace) -> int:
    from bench.train import PRESETS, run_train_bench

    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        from textgen.errors import ConfigError

        raise ConfigError(f"--presets: unknown {', '.join(unknown)} (choose from {', '.join(PRESETS)})")
    run_train_bench(args.data_root, args.out, args.presets, args.steps, args.threads)
    return 0


def _curves(args: argparse.Namespace) -> int:
    import json

    from bench.plots import plot_curves
    from textgen.errors import ConfigError

    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        raise ConfigError(f"--labels: {len(labels)} names for {len(args.runs)} runs")
    runs = {}
    for label, run in zip(labels, args.runs, strict=True):
        log = run / "metrics.jsonl"
        if not log.is_file():
            raise ConfigError(f"{run}: no metrics.jsonl (not a `textgen train` run directory)")
        runs[label] = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    print(plot_curves(runs, args.out, args.title))
    return 0


def _soak(args: argparse.Namespace) -> int:
    import json
    import sys

    from bench.soak import run_soak
    from textgen.errors import ConfigError

    if (args.checkpoint is None) == (args.bundle is None):
        raise ConfigError("give a CHECKPOINT or --bundle DIR (one of them)")
    if args.clients < 1:
        raise ConfigError(f"--clients: expected at least 1, got {args.clients}")
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    report = run_soak(
        args.bundle, args.checkpoint, args.out, seconds, args.clients, args.threads, args.session_ttl, args.sample_every
    )
    summary = {k: report[k] for k in ("load_seconds", "rss_mib", "threads", "fds", "tokens_generated", "internal")}
    print(json.dumps({**summary, "gauges_end": report["gauges_end"], "requests": report["requests"]}))
    for failure in report["failures"]:
        print(f"textgen bench soak: FAILED: {failure}", file=sys.stderr)
    return 0 if report["passed"] else 1


def _quality(args: argparse.Namespace) -> int:
    from bench.quality import run_quality_bench

    run_quality_bench(args.checkpoint, args.out, args.split, args.tokens, args.precisions, args.block)
    return 0


def _replicas(args: argparse.Namespace) -> int:
    from bench.replicas import run_replicas_bench
    from bench.serve import export_bundles

    bundle = export_bundles(args.checkpoint, args.out / "bundles", ["fp32"])["fp32"]
    run_replicas_bench(
        bundle,
        args.out,
        args.replicas,
        args.concurrency,
        args.max_tokens,
        args.repeats,
        args.threads,
        args.trials,
        args.failover_tokens,
        args.kill_after,
    )
    return 0


def _sampling(args: argparse.Namespace) -> int:
    from bench.sampling import run_sampling_bench

    run_sampling_bench(args.out, args.seconds)
    return 0
