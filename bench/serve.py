"""``textgen bench serve``: a real ``textgen serve`` process driven over gRPC by C concurrent streaming clients,
beside three baselines measured in the same run on the same model: the raw engine limit (a direct ONNX Runtime
``[C, 1]`` decode loop with the same vectorised sampling, no gRPC, no scheduler), the same server with batching
off (``--max-batch-size 1``), and what a user would write instead (a plain PyTorch eager loop, one request at a
time). Everything is reported as ratios, because the machines are shared and noisy."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from textgen.sampling import SamplingParams, new_rng, sample_batch


@dataclass
class LoadResult:
    """What C concurrent streaming clients saw."""

    concurrency: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    messages_per_stream: float
    # CPU time per generated token: the server process (all its threads) and this client process. On a small
    # machine the two share the cores, so these say where the time goes wherever the client runs.
    server_cpu_ms_per_token: float | None = None
    client_cpu_ms_per_token: float | None = None


@dataclass
class RawResult:
    batch: int
    steps: int
    step_ms: float
    tokens_per_s: float
    cpu_ms_per_token: float  # this process's CPU time (ONNX Runtime's threads included) per token


@dataclass
class EagerResult:
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    step_ms: float


def raw_engine(model: Any, batch: int, steps: int, params: SamplingParams) -> RawResult:
    """The engine limit: one ``[batch, 1]`` graph call and one vectorised sampling pass per step."""
    state = model.zero_state(batch)
    tokens = np.full((batch, 1), model.tokenizer.start_id, np.int64)
    rngs = [new_rng(i) for i in range(batch)]
    plist = [params] * batch
    seen = [np.zeros(model.vocab_size, bool) for _ in range(batch)]
    position = np.zeros(1, np.int64)
    for _ in range(5):  # warm up
        logits, state = model.run(tokens, position, state)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        logits, state = model.run(tokens, position, state)
        tokens = sample_batch(logits[:, 0], plist, rngs, seen).reshape(-1, 1)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return RawResult(batch, steps, seconds / steps * 1e3, batch * steps / seconds, cpu / (batch * steps) * 1e3)


def torch_eager(checkpoint: Path, requests: int, max_tokens: int, temperature: float, threads: int) -> EagerResult:
    """What a user would write instead of a server: the trained torch model, one request at a time, one token per
    forward call, softmax and ``torch.multinomial``."""
    import torch

    from training.checkpoint import load_checkpoint, model_from_checkpoint

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = model_from_checkpoint(load_checkpoint(checkpoint))
    model.eval()
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for seed in range(requests):
            generator = torch.Generator().manual_seed(seed)
            state = model.init_state(1)
            x = torch.tensor([[tokenizer.start_id]])
            for _ in range(max_tokens):
                logits, state = model(x, state)
                probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
                x = torch.multinomial(probs, 1, generator=generator)
                tokens += 1
    seconds = time.perf_counter() - start
    return EagerResult(requests, tokens, seconds, tokens / seconds, seconds / tokens * 1e3)


async def _stream(stub: Any, request: Any, out: list[tuple[float, list[float], list[int], int]]) -> None:
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


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q) * 1e3) if xs else 0.0


async def drive(
    target: str, concurrency: int, max_tokens: int, temperature: float, server_pid: int | None = None
) -> LoadResult:
    """C streams started at once, each asking for ``max_tokens`` sampled tokens with its own seed. With
    ``server_pid`` (a local server), the server's CPU time is read from /proc around the run."""
    import grpc

    from textgen.v1 import textgen_pb2 as pb
    from textgen.v1 import textgen_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        await stub.Generate(pb.GenerateRequest(max_tokens=4, seed=0))  # connect and warm up
        out: list[tuple[float, list[float], list[int], int]] = []
        server_cpu = process_cpu_seconds(server_pid)
        start, client_cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(
            *(
                _stream(stub, pb.GenerateRequest(max_tokens=max_tokens, temperature=temperature, seed=i), out)
                for i in range(concurrency)
            )
        )
        seconds, client_cpu = time.perf_counter() - start, time.process_time() - client_cpu
        server_cpu_after = process_cpu_seconds(server_pid)
    tokens = sum(r[3] for r in out)
    per_token = 1e3 / max(1, tokens)
    ttft = [r[1][0] - r[0] for r in out if r[1]]
    itl: list[float] = []
    for _, stamps, sizes, total in out:
        chars = sum(sizes) or 1
        for i in range(1, len(stamps)):  # a coalesced message's gap is shared by the tokens it carries
            n = max(1, round(sizes[i] * total / chars))
            itl.extend([(stamps[i] - stamps[i - 1]) / n] * n)
    return LoadResult(
        concurrency,
        tokens,
        seconds,
        tokens / seconds,
        _pct(ttft, 50),
        _pct(ttft, 99),
        _pct(itl, 50),
        _pct(itl, 99),
        float(np.mean([len(r[1]) for r in out])),
        None if server_cpu is None or server_cpu_after is None else (server_cpu_after - server_cpu) * per_token,
        client_cpu * per_token,
    )


def process_cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU time of a process and all its threads, from /proc (Linux; None elsewhere)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


class ServerProcess:
    """``textgen serve`` in its own process, as users run it (in the bench process it would share the client's
    GIL)."""

    def __init__(
        self, bundle: Path, threads: int, max_batch: int, max_tokens: int, stream_interval: int | None = None
    ) -> None:
        cmd = [sys.executable, "-m", "textgen.cli", "serve", "--bundle", str(bundle), "--port", "0",
               "--providers", "CPUExecutionProvider", "--intra-op-threads", str(threads),
               "--max-batch-size", str(max_batch), "--max-queue", "4096",
               "--max-tokens-limit", str(max(max_tokens, 256)), "--log-level", "info"]  # fmt: skip
        if stream_interval is not None:
            cmd += ["--max-stream-interval", str(stream_interval)]
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in stop); a file, not a pipe: none to drain
        self.proc = subprocess.Popen(cmd, stderr=self.log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.port = self._port()

    def _port(self) -> int:
        """The gRPC port, from the server's start-up log line ("... on 127.0.0.1:PORT (plaintext)")."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            self.log.seek(0)
            for line in self.log:
                if "textgen serving " in line and " on 127.0.0.1:" in line:
                    return int(line.split(" on 127.0.0.1:")[1].split()[0])
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"textgen serve exited with {self.proc.returncode}: {self.log.read()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("textgen serve did not start listening within 120 s")

    def drive(self, concurrency: int, max_tokens: int, temperature: float) -> LoadResult:
        return asyncio.run(drive(f"127.0.0.1:{self.port}", concurrency, max_tokens, temperature, self.proc.pid))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _median(runs: list[Any]) -> Any:
    """The run with the median tokens/s (an actual run, so its latencies belong to it)."""
    return sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]


def export_bundles(checkpoint: Path, root: Path, precisions: list[str]) -> dict[str, Path]:
    """The checkpoint as one bundle per precision (verified, as ``textgen export`` makes them)."""
    from exporter.publish import export_bundle

    bundles = {}
    for precision in precisions:
        out = root / f"bench-{precision}" / "1"
        if not (out / "manifest.json").exists():
            export_bundle(checkpoint, out, quantize=None if precision == "fp32" else precision)
        bundles[precision] = out
    return bundles


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
    }


def run_serve_bench(
    checkpoint: Path,
    out_dir: Path,
    concurrency: list[int],
    max_tokens: int,
    precisions: list[str],
    threads: int,
    eager_requests: int,
    repeats: int = 3,
    temperature: float = 1.0,
    stream_interval: int | None = None,
) -> dict[str, Any]:
    """Every measurement for every precision; writes ``serve.json`` and the plots into ``out_dir``."""
    from service.models import ModelRegistry
    from service.settings import load_settings

    out_dir.mkdir(parents=True, exist_ok=True)
    bundles = export_bundles(checkpoint, out_dir / "bundles", precisions)
    params = SamplingParams(temperature=temperature)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "max_tokens": max_tokens,
        "threads": threads,
        "repeats": repeats,
        "max_stream_interval": stream_interval,  # None: the server's default
        "machine": machine(),
        "command": " ".join(["textgen", *sys.argv[1:]]) if sys.argv[0].endswith("textgen") else "",
        "precisions": {},
    }
    eager = torch_eager(checkpoint, eager_requests, max_tokens, temperature, threads)
    report["torch_eager"] = asdict(eager)
    print(f"torch eager: {eager.tokens_per_s:,.0f} tokens/s ({eager.step_ms:.3f} ms/token)", flush=True)
    for precision, bundle in bundles.items():
        settings = load_settings(bundle=bundle, port=0, providers=["CPUExecutionProvider"], intra_op_threads=threads)
        model = next(iter(ModelRegistry.load(settings)))
        rows = []
        batched = ServerProcess(bundle, threads, max(concurrency), max_tokens, stream_interval)
        try:
            for c in concurrency:
                # alternate the two, `repeats` times each, and keep the median run of each: a burst of noise on
                # the shared machine then moves neither side of the ratio much
                raws, loads = [], []
                for _ in range(repeats):
                    raws.append(raw_engine(model, c, max(64, max_tokens), params))
                    loads.append(batched.drive(c, max_tokens, temperature))
                raw, load = _median(raws), _median(loads)
                rows.append({
                    "concurrency": c, "raw": asdict(raw), "server": asdict(load),
                    "raw_runs": [r.tokens_per_s for r in raws], "server_runs": [r.tokens_per_s for r in loads],
                })  # fmt: skip
        finally:
            batched.stop()
        single = ServerProcess(bundle, threads, 1, max_tokens)
        try:
            for row in rows:
                row["server_batch1"] = asdict(single.drive(row["concurrency"], max_tokens, temperature))
        finally:
            single.stop()
        for row in rows:
            server = row["server"]["tokens_per_s"]
            row["vs_raw"] = server / row["raw"]["tokens_per_s"]
            row["vs_batch1"] = server / row["server_batch1"]["tokens_per_s"]
            row["vs_torch_eager"] = server / eager.tokens_per_s
            if row["concurrency"] == 1:
                row["itl_p50_vs_raw_step"] = row["server"]["itl_p50_ms"] / row["raw"]["step_ms"]
            print(f"{precision} C={row['concurrency']}: " + json.dumps(_summary(row)), flush=True)
        report["precisions"][precision] = rows
    (out_dir / "serve.json").write_text(json.dumps(report, indent=1))
    from bench.plots import plot_serve

    plot_serve(report, out_dir)
    return report


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    s = row["server"]
    out = {
        "tokens_per_s": round(s["tokens_per_s"]),
        "raw": round(row["raw"]["tokens_per_s"]),
        "batch1": round(row["server_batch1"]["tokens_per_s"]),
        "vs_raw": round(row["vs_raw"], 3),
        "vs_batch1": round(row["vs_batch1"], 2),
        "vs_torch_eager": round(row["vs_torch_eager"], 1),
        "ttft_ms": [round(s["ttft_p50_ms"], 2), round(s["ttft_p99_ms"], 2)],
        "itl_ms": [round(s["itl_p50_ms"], 3), round(s["itl_p99_ms"], 3)],
        "cpu_ms_per_token": {
            "raw": round(row["raw"]["cpu_ms_per_token"], 4),
            "server": s["server_cpu_ms_per_token"] and round(s["server_cpu_ms_per_token"], 4),
            "client": round(s["client_cpu_ms_per_token"], 4),
        },
    }
    if "itl_p50_vs_raw_step" in row:
        out["itl_p50_vs_raw_step"] = round(row["itl_p50_vs_raw_step"], 3)
    return out
