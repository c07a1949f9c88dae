"""``textgen bench serve``: a real server driven over gRPC by C concurrent streaming clients, beside the raw
engine limit measured in the same run (a direct ONNX Runtime decode loop with the same batch size and the same
vectorised sampling, no gRPC, no scheduler). Reports ratios, because the machines are shared and noisy."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from textgen.sampling import SamplingParams, new_rng, sample_batch


@dataclass
class LoadResult:
    concurrency: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    messages_per_stream: float


@dataclass
class RawResult:
    batch: int
    steps: int
    step_ms: float
    tokens_per_s: float


def raw_engine(model, batch: int, steps: int, params: SamplingParams) -> RawResult:
    """The engine limit: one ``[batch, 1]`` graph call and one vectorised sampling pass per step."""
    state = model.zero_state(batch)
    tokens = np.full((batch, 1), model.tokenizer.start_id, np.int64)
    rngs = [new_rng(i) for i in range(batch)]
    plist = [params] * batch
    seen = [np.zeros(model.vocab_size, bool) for _ in range(batch)]
    position = np.zeros(1, np.int64)
    for _ in range(5):  # warm up
        logits, state = model.run(tokens, position, state)
    start = time.perf_counter()
    for _ in range(steps):
        logits, state = model.run(tokens, position, state)
        tokens = sample_batch(logits[:, 0], plist, rngs, seen).reshape(-1, 1)
    seconds = time.perf_counter() - start
    return RawResult(batch, steps, seconds / steps * 1e3, batch * steps / seconds)


async def _stream(stub, request, out: list) -> None:
    start = time.perf_counter()
    stamps, sizes = [], []
    total = 0
    async for msg in stub.GenerateStream(request):
        now = time.perf_counter()
        if msg.text:
            stamps.append(now)
            sizes.append(len(msg.text))
        if msg.HasField("complete"):
            total = msg.complete.generated_tokens
    out.append((start, stamps, sizes, total))


async def drive(target: str, concurrency: int, max_tokens: int, prompt: str, params: SamplingParams) -> LoadResult:
    import grpc

    from textgen.v1 import textgen_pb2 as pb
    from textgen.v1 import textgen_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        base = dict(
            prompt=prompt, max_tokens=max_tokens, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p
        )
        await stub.Generate(pb.GenerateRequest(**{**base, "max_tokens": 4}, seed=0))  # connect and warm up
        out: list = []
        start = time.perf_counter()
        await asyncio.gather(*(_stream(stub, pb.GenerateRequest(**base, seed=i), out) for i in range(concurrency)))
        seconds = time.perf_counter() - start
    tokens = sum(r[3] for r in out)
    ttft = [r[1][0] - r[0] for r in out if r[1]]
    itl = []
    for _, stamps, sizes, total in out:
        chars = sum(sizes) or 1
        for i in range(1, len(stamps)):  # a coalesced message's gap is shared by the tokens it carries
            n = max(1, round(sizes[i] * total / chars))
            itl.extend([(stamps[i] - stamps[i - 1]) / n] * n)
    pct = lambda xs, q: float(np.percentile(xs, q) * 1e3) if xs else 0.0  # noqa: E731
    return LoadResult(
        concurrency,
        tokens,
        seconds,
        tokens / seconds,
        pct(ttft, 50),
        pct(ttft, 99),
        pct(itl, 50),
        pct(itl, 99),
        float(np.mean([len(r[1]) for r in out])),
    )


def start_server(bundle: Path, threads: int, max_batch: int, max_tokens: int) -> tuple[subprocess.Popen, int]:
    """``textgen serve`` in its own process, as users run it (in-process it would share the client's GIL)."""
    cmd = [sys.executable, "-m", "textgen.cli", "serve", "--bundle", str(bundle), "--port", "0",
           "--providers", "CPUExecutionProvider", "--intra-op-threads", str(threads),
           "--max-batch-size", str(max_batch), "--max-tokens-limit", str(max(max_tokens, 16))]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    for line in proc.stderr:
        if " on 127.0.0.1:" in line:
            return proc, int(line.split(" on 127.0.0.1:")[1].split()[0])
    raise RuntimeError(f"textgen serve exited with {proc.wait()}")


def run_serve_bench(
    bundle: Path, concurrency: list[int], max_tokens: int, prompt: str, threads: int, out: Path | None
) -> dict:
    from service.models import ModelRegistry
    from service.settings import load_settings

    params = SamplingParams(temperature=1.0)
    settings = load_settings(bundle=bundle, port=0, providers=["CPUExecutionProvider"], intra_op_threads=threads)
    model = next(iter(ModelRegistry.load(settings)))
    report: dict = {"bundle": str(bundle), "max_tokens": max_tokens, "threads": threads, "runs": []}
    server, port = start_server(bundle, threads, max(concurrency), max_tokens)
    try:
        for c in concurrency:
            raw = raw_engine(model, c, max(50, max_tokens), params)
            load = asyncio.run(drive(f"127.0.0.1:{port}", c, max_tokens, prompt, params))
            row = {"raw": asdict(raw), "server": asdict(load), "server_vs_raw": load.tokens_per_s / raw.tokens_per_s}
            if c == 1:
                row["itl_p50_vs_raw_step"] = load.itl_p50_ms / raw.step_ms
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    if out is not None:
        out.write_text(json.dumps(report, indent=1))
    return report
