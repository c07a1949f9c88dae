"""``textgen bench serve --http``: the OpenAI-compatible HTTP API (``POST /v1/completions``, ``stream: true``,
server-sent events) against gRPC (``GenerateStream``) on one ``textgen serve`` process serving both, as clients
see them. Both transports get the same work: the same streams (``bench.load``'s sampling mix, stream i with seed
i, from the start token, ``max_tokens`` each), on connections opened before the clock (HTTP/1.1 keep-alive, one
connection a stream; one HTTP/2 channel). Per C, ``repeats`` rounds run both once each, alternating which goes
first, and the median run (by tokens/s) of each is kept. The texts are compared seed by seed: a transport that
changed the work would show there."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.load import (
    MIX,
    LoadResult,
    ServerProcess,
    _cpu,
    _Stream,
    _stream,
    load_result,
    requests,
    stream_settings,
)
from bench.serve import CPU, CUDA, WARM_UP_TOKENS, _median, prepare, report_head, rows_by_concurrency
from bench.sse import EventParser

TRANSPORTS = ("grpc", "http")
DONE = "[DONE]"


class HttpServerProcess(ServerProcess):
    """``textgen serve --http-port 0``: gRPC and the HTTP API in one process; ``http_port`` read from its log."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, extra=("--http-port", "0"), **kwargs)
        self.http_port = self._http_port()

    def _http_port(self) -> int:
        marker = "HTTP API (OpenAI-compatible) on http://127.0.0.1:"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.log.seek(0)  # read to the end: the server's stderr shares this file's offset
            for line in self.log.read().splitlines():
                if marker in line:
                    return int(line.split(marker)[1].split("/")[0])
            if self.proc.poll() is not None:
                raise RuntimeError(f"textgen serve exited with {self.proc.returncode}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("textgen serve did not log its HTTP API's port within 60 s")


def http_body(request: Any) -> dict[str, Any]:
    """A GenerateRequest's work as a ``/v1/completions`` streaming body: the same fields with the same values (the
    proto's float32 values, as the gRPC server reads them), the usage chunk for the token count."""
    body: dict[str, Any] = {"prompt": "", "max_tokens": request.max_tokens, "seed": request.seed, "stream": True,
                            "stream_options": {"include_usage": True}}  # fmt: skip
    for name in ("temperature", "top_p", "repetition_penalty"):
        if request.HasField(name):
            body[name] = request.__getattribute__(name)
    if request.top_k:
        body["top_k"] = request.top_k
    return body


async def _http_stream(session: Any, url: str, body: dict[str, Any], out: list[_Stream]) -> None:
    """One streamed completion, read as its events arrive (what the stamps mean is as for gRPC's messages)."""
    start = time.perf_counter()
    stamps: list[float] = []
    sizes: list[int] = []
    texts: list[str] = []
    total = 0
    parser = EventParser()
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"POST {url}: HTTP {response.status}: {(await response.text())[:500]}")
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            for data in parser.feed(chunk):
                if data == DONE:
                    continue
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"POST {url}: the stream ended with {event['error']}")
                for choice in event["choices"]:
                    if choice["text"]:
                        stamps.append(now)
                        sizes.append(len(choice["text"]))
                        texts.append(choice["text"])
                if event.get("usage"):
                    total = event["usage"]["completion_tokens"]
    out.append(_Stream(start, stamps, sizes, total, "".join(texts)))


async def _timed(streams: list[Callable[[list[_Stream]], Awaitable[None]]], pid: int) -> tuple[LoadResult, list[str]]:
    """The streams started at once, timed, with the server's and this process's CPU time; the texts in order."""
    outs: list[list[_Stream]] = [[] for _ in streams]
    server_cpu = _cpu([pid])
    start, client_cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(stream(out) for stream, out in zip(streams, outs, strict=True)))
    seconds, client_cpu = time.perf_counter() - start, time.process_time() - client_cpu
    server_after = _cpu([pid])
    server = None if server_cpu is None or server_after is None else server_after - server_cpu
    done = [out[0] for out in outs]
    return load_result(done, seconds, client_cpu, server), [s.text for s in done]


async def drive_grpc(port: int, batch: list[Any], pid: int) -> tuple[LoadResult, list[str]]:
    import grpc

    from textgen.v1 import textgen_pb2 as pb
    from textgen.v1 import textgen_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TextGenerationStub(channel)
        await stub.Generate(pb.GenerateRequest(max_tokens=2, seed=0), wait_for_ready=True)  # connected
        return await _timed([lambda out, r=r: _stream(stub, r, out) for r in batch], pid)


async def drive_http(port: int, batch: list[Any], pid: int) -> tuple[LoadResult, list[str]]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/completions"
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)  # no pool limit: a connection a stream
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:

        async def warm() -> None:
            async with session.post(url, json={"prompt": "", "max_tokens": 2, "seed": 0}) as response:
                await response.read()

        await asyncio.gather(*(warm() for _ in batch))  # as many kept-alive connections as streams, before the clock
        bodies = [http_body(r) for r in batch]
        return await _timed([lambda out, b=b: _http_stream(session, url, b, out) for b in bodies], pid)


def _drive(server: HttpServerProcess, transport: str, batch: list[Any]) -> tuple[LoadResult, list[str]]:
    if transport == "grpc":
        return asyncio.run(drive_grpc(server.port, batch, server.proc.pid))
    return asyncio.run(drive_http(server.http_port, batch, server.proc.pid))


def measure(server: HttpServerProcess, c: int, repeats: int, sampling: str, max_tokens: int) -> dict[str, Any]:
    """``repeats`` rounds at C streams, both transports once a round (gRPC first in even rounds, HTTP in odd)."""
    batch = requests(sampling, c, max_tokens)
    runs: dict[str, list[LoadResult]] = {t: [] for t in TRANSPORTS}
    texts: dict[str, list[list[str]]] = {t: [] for t in TRANSPORTS}
    for r in range(repeats):
        for transport in TRANSPORTS if r % 2 == 0 else TRANSPORTS[::-1]:
            result, text = _drive(server, transport, batch)
            runs[transport].append(result)
            texts[transport].append(text)
    reference = texts["grpc"][0]
    mismatched = sorted({seed for t in TRANSPORTS for run in texts[t] for seed, text in enumerate(run)
                         if text != reference[seed]})  # fmt: skip
    results = {t: asdict(_median(rs)) for t, rs in runs.items()}
    return {
        "concurrency": c,
        "settings": dict(Counter(stream_settings(sampling, c))),
        "results": results,
        "runs": {t: [r.tokens_per_s for r in rs] for t, rs in runs.items()},
        "ratios": ratios(results),
        "texts_match": not mismatched,
        "mismatched_seeds": mismatched,
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """HTTP's figures over gRPC's (above 1: HTTP is faster for tokens/s, slower or costlier for the rest)."""
    http, grpc = results["http"], results["grpc"]
    out = {}
    for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "server_cpu_ms_per_token",
                "client_cpu_ms_per_token"):  # fmt: skip
        if http.get(key) is not None and grpc.get(key):
            out[f"http_vs_grpc_{key}"] = http[key] / grpc[key]
    return out


def run_http_bench(
    checkpoint: Path,
    out_dir: Path,
    concurrency: list[int],
    max_tokens: int,
    precisions: list[str],
    threads: int,
    repeats: int = 3,
    sampling: str = MIX,
    device: str = "cpu",
    stream_interval: int | None = None,
) -> dict[str, Any]:
    """Both transports at every C for every precision; writes ``serve-http.json`` into ``out_dir`` and prints a
    table per precision."""
    import aiohttp

    bundles = prepare(checkpoint, out_dir, precisions, repeats, max_tokens, sampling, device, [])
    options = {"transports": list(TRANSPORTS), "concurrency": concurrency, "max_tokens": max_tokens,
               "threads": threads, "sampling": sampling, "device": device,
               "stream_interval": stream_interval}  # fmt: skip
    report: dict[str, Any] = {
        **report_head(checkpoint, options, repeats),
        "clients": {
            "grpc": "grpc.aio, one HTTP/2 channel",
            "http": f"aiohttp {aiohttp.__version__}, HTTP/1.1 keep-alive, a connection a stream",
        },
        "http_server": _http_server(),
        "precisions": {},
    }
    providers = CUDA if device == "cuda" else CPU
    for precision, bundle in bundles.items():
        server = HttpServerProcess(bundle, threads, max(concurrency), max_tokens, stream_interval, providers)
        try:
            for c in concurrency:  # warm-up: first-run allocations, each C's batch shapes, both transports' paths
                for transport in TRANSPORTS:
                    _drive(server, transport, requests(sampling, c, WARM_UP_TOKENS))
            rows = rows_by_concurrency(
                precision, concurrency, lambda c, s=server: measure(s, c, repeats, sampling, max_tokens)
            )
        finally:
            server.stop()
        report["precisions"][precision] = rows
        print(table(precision, rows), flush=True)
    (out_dir / "serve-http.json").write_text(json.dumps(report, indent=1))
    return report


def _http_server() -> str:
    """uvicorn and the HTTP/1.1 parser it picks in this environment (the server runs with this interpreter):
    httptools (C) when installed, else h11 (pure Python); it weighs on the server's CPU per request."""
    import importlib.util

    import uvicorn

    return f"uvicorn {uvicorn.__version__}, {'httptools' if importlib.util.find_spec('httptools') else 'h11'}"


def table(precision: str, rows: list[dict[str, Any]]) -> str:
    """A markdown table of one precision's medians: a line per C and transport, then HTTP / gRPC."""
    head = ["C", "transport", "tok/s", "TTFT p50/p99 ms", "gap p50/p99 ms", "msgs/stream",
            "CPU ms/token server / client", "same texts"]  # fmt: skip
    lines = [f"\n{precision}: HTTP (OpenAI API, SSE) vs gRPC", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cpu(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for row in rows:
        for transport, label in (("grpc", "gRPC"), ("http", "HTTP")):
            s = row["results"][transport]
            lines.append("| " + " | ".join([
                str(row["concurrency"]), label, f"{s['tokens_per_s']:,.0f}",
                f"{s['ttft_p50_ms']:.2f} / {s['ttft_p99_ms']:.2f}", f"{s['gap_p50_ms']:.2f} / {s['gap_p99_ms']:.2f}",
                f"{s['messages_per_stream']:.0f}",
                f"{cpu(s['server_cpu_ms_per_token'])} / {cpu(s['client_cpu_ms_per_token'])}",
                "yes" if row["texts_match"] else f"NO: seeds {row['mismatched_seeds'][:8]}",
            ]) + " |")  # fmt: skip
        r = {k.removeprefix("http_vs_grpc_"): f"{v:.3f}" for k, v in row["ratios"].items()}
        cells = [r.get("tokens_per_s", "-"), f"{r.get('ttft_p50_ms', '-')} / {r.get('ttft_p99_ms', '-')}",
                 f"{r.get('gap_p50_ms', '-')} / -", "",
                 f"{r.get('server_cpu_ms_per_token', '-')} / {r.get('client_cpu_ms_per_token', '-')}", ""]  # fmt: skip
        lines.append(f"| {row['concurrency']} | HTTP / gRPC | " + " | ".join(cells) + " |")
    return "\n".join(lines)
