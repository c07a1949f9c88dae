"""Two checkouts' servers on one bundle, driven alternately by the same client: before/after figures for a change
that predates today's ``textgen bench serve`` (an older server has no step graph for the raw loops to use).

    git worktree add /tmp/before <commit>
    python -m bench.compare_servers BUNDLE /tmp/before . --concurrency 1,64 --out before-after.json

Each tree's server runs with that tree's code (``PYTHONPATH``) and this environment's packages. Streams use the
sampling mix of ``bench.load`` (stream i: the i % 4-th setting, seed i), 256 tokens each; per C, ``--repeats``
rounds alternate the order of the two servers and the median run (by tokens/s) of each is kept."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.load import SETTINGS
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as pb_grpc


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(tree: Path, bundle: Path, port: int) -> subprocess.Popen[bytes]:
    log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process)
    cmd = [sys.executable, "-m", "textgen.cli", "serve", "--bundle", str(bundle.resolve()), "--port", str(port),
           "--providers", "CPUExecutionProvider", "--max-queue", "4096", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=log, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree.resolve())})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                return proc
            except grpc.FutureTimeoutError:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server of {tree} exited with {proc.returncode}") from None
    raise RuntimeError(f"the server of {tree} did not start within 120 s")


async def _drive(port: int, concurrency: int, tokens: int, pid: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TextGenerationStub(channel)

        async def one(i: int) -> list[float]:
            stamps = []
            request = pb.GenerateRequest(max_tokens=tokens, seed=i, **list(SETTINGS.values())[i % len(SETTINGS)])
            async for msg in stub.GenerateStream(request):
                if msg.text:
                    stamps.append(time.perf_counter())
            return stamps

        await asyncio.gather(*(one(1000 + i) for i in range(min(concurrency, 8))))  # warm-up
        cpu, start = _cpu_seconds(pid), time.perf_counter()
        runs = await asyncio.gather(*(one(i) for i in range(concurrency)))
        seconds, cpu = time.perf_counter() - start, _cpu_seconds(pid) - cpu
    gaps = np.concatenate([np.diff(s) for s in runs]) * 1e3
    total = concurrency * tokens
    gap = float(np.median(gaps))
    return {"tokens_per_s": total / seconds, "gap_p50_ms": gap, "cpu_us_per_token": cpu / total * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("before", type=Path, help="the older checkout")
    parser.add_argument("after", type=Path, help="the newer checkout")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("before-after.json"))
    args = parser.parse_args()
    trees = {"before": args.before, "after": args.after}
    ports = {"before": 50991, "after": 50992}
    servers = {k: _start(tree, args.bundle, ports[k]) for k, tree in trees.items()}
    out: dict[str, Any] = {}
    try:
        for c in (int(v) for v in args.concurrency.split(",")):
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
            for r in range(args.repeats):
                for k in ("before", "after") if r % 2 == 0 else ("after", "before"):
                    runs[k].append(asyncio.run(_drive(ports[k], c, args.tokens, servers[k].pid)))
            for k, v in runs.items():
                out[f"{k} C={c}"] = sorted(v, key=lambda m: m["tokens_per_s"])[len(v) // 2]
                print(k, c, json.dumps({m: round(x, 3) for m, x in out[f"{k} C={c}"].items()}), flush=True)
    finally:
        for proc in servers.values():
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
