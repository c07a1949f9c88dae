"""The load side of ``textgen bench serve``: the sampling mix, a real ``textgen serve`` process, and C concurrent
asyncio streaming clients with what they saw (time to first token, every gap between messages, per-token
figures, CPU time of the server and of the client)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from textgen.sampling import SamplingParams

# The four request settings of a realistic mix; stream i uses setting i % 4 (so C = 1 uses the first). Every
# one samples at temperature 1: the filters are what costs, and a greedy row would skip the draw.
SETTINGS: dict[str, dict[str, float | int]] = {
    "temperature": {"temperature": 1.0},
    "top_k": {"temperature": 1.0, "top_k": 40},
    "top_p": {"temperature": 1.0, "top_p": 0.9},
    "penalty": {"temperature": 1.0, "repetition_penalty": 1.3},
}
MIX = "mix"


def stream_settings(sampling: str, concurrency: int) -> list[str]:
    """The setting of each of ``concurrency`` streams: ``mix`` cycles through SETTINGS, a name repeats one."""
    if sampling == MIX:
        names = list(SETTINGS)
        return [names[i % len(names)] for i in range(concurrency)]
    if sampling not in SETTINGS:
        raise ValueError(f"unknown sampling setting {sampling!r} (choose {MIX} or one of {', '.join(SETTINGS)})")
    return [sampling] * concurrency


def requests(sampling: str, concurrency: int, max_tokens: int) -> list[Any]:
    """The GenerateRequests of one run: stream i has seed i and its setting, and starts from the start token."""
    from textgen.v1 import textgen_pb2 as pb

    return [
        pb.GenerateRequest(max_tokens=max_tokens, seed=i, **SETTINGS[name])
        for i, name in enumerate(stream_settings(sampling, concurrency))
    ]


def request_params(request: Any) -> SamplingParams:
    """The parameters a server derives from a request (an unset optional field is its default; the proto's
    float32 fields already hold the rounded values the server reads)."""
    return SamplingParams(
        temperature=request.temperature if request.HasField("temperature") else 1.0,
        top_k=request.top_k,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        repetition_penalty=request.repetition_penalty if request.HasField("repetition_penalty") else 1.0,
    )


def row_params(sampling: str, concurrency: int) -> list[SamplingParams]:
    """Per-row parameters for the raw loops: exactly what the server makes of the clients' requests."""
    return [request_params(r) for r in requests(sampling, concurrency, 1)]


@dataclass
class LoadResult:
    """What C concurrent streaming clients saw."""

    concurrency: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ms_per_token: float  # amortised over all streams: wall time / tokens
    stream_ms_per_token: float  # one stream's own pace, median over streams: its duration / its tokens
    ttft_p50_ms: float
    ttft_p99_ms: float
    # every gap between consecutive messages of a stream, as the client sees it (p50/p99 over all streams)
    gap_p50_ms: float
    gap_p99_ms: float
    # the same gaps shared out over the tokens each message carries (per-token, amortised)
    itl_p50_ms: float
    itl_p99_ms: float
    messages_per_stream: float
    # CPU time per generated token: the server process (all its threads) and this client process. On a small
    # machine the two share the cores, so these say where the time goes wherever the client runs.
    server_cpu_ms_per_token: float | None = None
    client_cpu_ms_per_token: float | None = None


@dataclass
class _Stream:
    start: float
    stamps: list[float]
    sizes: list[int]  # characters per message
    tokens: int
    text: str = ""  # the whole text (``bench.transports`` compares transports' texts seed by seed)


async def _stream(stub: Any, request: Any, out: list[_Stream]) -> None:
    start = time.perf_counter()
    stamps, sizes, texts = [], [], []
    total = 0
    async for msg in stub.GenerateStream(request):
        now = time.perf_counter()
        if msg.text:
            stamps.append(now)
            sizes.append(len(msg.text))
            texts.append(msg.text)
        if msg.HasField("complete"):
            total = msg.complete.generated_tokens
    out.append(_Stream(start, stamps, sizes, total, "".join(texts)))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q) * 1e3) if xs else 0.0


def figures(streams: list[_Stream], seconds: float) -> dict[str, float]:
    """The client-side figures of one run (seconds in, milliseconds out)."""
    tokens = sum(s.tokens for s in streams)
    ttft = [s.stamps[0] - s.start for s in streams if s.stamps]
    gaps: list[float] = []
    itl: list[float] = []
    for s in streams:
        chars = sum(s.sizes) or 1
        for i in range(1, len(s.stamps)):
            gap = s.stamps[i] - s.stamps[i - 1]
            gaps.append(gap)
            # a coalesced message's gap is shared by the tokens it carries (characters stand in for tokens)
            n = max(1, round(s.sizes[i] * s.tokens / chars))
            itl.extend([gap / n] * n)
    paces = [(s.stamps[-1] - s.start) / s.tokens for s in streams if s.stamps and s.tokens]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ms_per_token": seconds / max(1, tokens) * 1e3,
        "stream_ms_per_token": float(np.median(paces) * 1e3) if paces else 0.0,
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p99_ms": _pct(ttft, 99),
        "gap_p50_ms": _pct(gaps, 50),
        "gap_p99_ms": _pct(gaps, 99),
        "itl_p50_ms": _pct(itl, 50),
        "itl_p99_ms": _pct(itl, 99),
        "messages_per_stream": float(np.mean([len(s.stamps) for s in streams])),
    }


async def drive(target: str, batch: list[Any], server_pid: int | list[int] | None = None) -> LoadResult:
    """The streams of ``batch`` started at once. With ``server_pid`` (a local server, or several replicas), the
    servers' CPU time is read from /proc around the run. ``target`` may list replicas (``textgen.client``'s
    forms): calls are then balanced with round_robin."""
    import grpc

    from textgen.client import channel_target
    from textgen.v1 import textgen_pb2 as pb
    from textgen.v1 import textgen_pb2_grpc as pb_grpc

    pids = [server_pid] if isinstance(server_pid, int) else server_pid
    target, options = channel_target(target)
    async with grpc.aio.insecure_channel(target, options) as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        for _ in range(len(pids or [0])):  # every replica connected before the clock
            await stub.Generate(pb.GenerateRequest(max_tokens=2, seed=0), wait_for_ready=True)
        out: list[_Stream] = []
        server_cpu = _cpu(pids)
        start, client_cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(_stream(stub, r, out) for r in batch))
        seconds, client_cpu = time.perf_counter() - start, time.process_time() - client_cpu
        server_cpu_after = _cpu(pids)
    server = None if server_cpu is None or server_cpu_after is None else server_cpu_after - server_cpu
    return load_result(out, seconds, client_cpu, server)


def load_result(streams: list[_Stream], seconds: float, client_cpu: float, server_cpu: float | None) -> LoadResult:
    """One run's ``LoadResult``: the streams' figures and the CPU seconds spent (server: None where unknown)."""
    f = figures(streams, seconds)
    per_token = 1e3 / max(1, f["tokens"])
    return LoadResult(
        concurrency=len(streams),
        **f,
        server_cpu_ms_per_token=None if server_cpu is None else server_cpu * per_token,
        client_cpu_ms_per_token=client_cpu * per_token,
    )


def _cpu(pids: list[int] | None) -> float | None:
    seconds = [process_cpu_seconds(p) for p in pids or []]
    return None if not seconds or None in seconds else sum(s for s in seconds if s is not None)


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
        self,
        bundle: Path,
        threads: int,
        max_batch: int,
        max_tokens: int,
        stream_interval: int | None = None,
        providers: str = "CPUExecutionProvider",
        cuda_graphs: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        cmd = [sys.executable, "-m", "textgen.cli", "serve", "--bundle", str(bundle), "--port", "0",
               "--providers", providers, "--intra-op-threads", str(threads),
               "--max-batch-size", str(max_batch), "--max-queue", "4096",
               "--max-tokens-limit", str(max(max_tokens, 256)), "--log-level", "info"]  # fmt: skip
        if cuda_graphs:
            cmd += ["--cuda-graphs", "true"]
        if stream_interval is not None:
            cmd += ["--max-stream-interval", str(stream_interval)]
        cmd += extra
        self.metrics_url = ""  # with extra "--metrics-port 0": read from the start-up line too
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
                    if "metrics on http://" in line:
                        self.metrics_url = line.split("metrics on ")[1].split()[0].rstrip(";,")
                    return int(line.split(" on 127.0.0.1:")[1].split()[0])
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"textgen serve exited with {self.proc.returncode}: {self.log.read()[-2000:]}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("textgen serve did not start listening within 120 s")

    def drive(self, batch: list[Any]) -> LoadResult:
        return asyncio.run(drive(f"127.0.0.1:{self.port}", batch, self.proc.pid))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
