"""``textgen bench serve``: a real ``textgen serve`` process driven over gRPC by C concurrent streaming clients
(``bench.load``), beside baselines measured in the same run on the same bundle, at the same batch, with the same
per-stream sampling parameters and seeds (``bench.baselines``): the raw graph loop, the raw IOBinding loop, the
same server with batching off, and a batched PyTorch eager loop. For each C, every configuration runs once per
round, in a fixed order, for ``repeats`` rounds, and the median run of each is kept: a burst of noise on a shared
machine then lands on every configuration alike. Everything is reported as ratios."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from bench.baselines import load_torch_model, raw_graph_loop, raw_iobinding_loop, torch_eager
from bench.load import MIX, SETTINGS, ServerProcess, requests, row_params, stream_settings
from textgen.errors import ConfigError

# Every configuration, in the order a round runs them; ``LABELS`` names them in the table.
CPU_CONFIGS = ("raw", "raw_iobinding", "server", "server_batch1", "torch_eager")
CUDA_CONFIGS = (
    "raw", "raw_iobinding", "raw_iobinding_graphs", "server", "server_graphs", "server_batch1", "torch_eager",
)  # fmt: skip
LABELS = {
    "raw": "raw graph loop",
    "raw_iobinding": "raw IOBinding loop",
    "raw_iobinding_graphs": "raw IOBinding + CUDA graphs",
    "server": "textgen serve",
    "server_graphs": "textgen serve + CUDA graphs",
    "server_batch1": "textgen, max batch 1",
    "torch_eager": "PyTorch eager (batched)",
}
WARM_UP_TOKENS = 8  # per stream, at every C, before any measurement (CUDA graphs capture per batch bucket)
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"

Runner = Callable[[int], Any]


def configurations(device: str, wanted: list[str] | None) -> list[str]:
    """The configurations to measure on ``device``, in round order (``wanted``: a subset, any order)."""
    available = CUDA_CONFIGS if device == "cuda" else CPU_CONFIGS
    if wanted is None:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ConfigError(
            f"--configs: {', '.join(unknown)} not measured on {device} (choose from {', '.join(available)})"
        )
    return [c for c in available if c in wanted]


def check_device(device: str, precisions: list[str], configs: list[str]) -> None:
    """GPU mode needs a GPU: refuse at once, with the reason, rather than measure the CPU under a GPU's name."""
    if device == "cpu":
        return
    import onnxruntime as ort

    from service.providers import nvidia_gpu_present

    if CUDA not in ort.get_available_providers():
        raise ConfigError(
            f"--device cuda: this ONNX Runtime build has no {CUDA} (it offers "
            f"{', '.join(ort.get_available_providers())}; install onnxruntime-gpu)"
        )
    if not nvidia_gpu_present():
        raise ConfigError("--device cuda: no NVIDIA GPU here (no usable /dev/nvidiaN device); use --device cpu")
    if "int8" in precisions:
        raise ConfigError(
            "--device cuda: int8 bundles run only on the CPU (dynamically quantised kernels); use fp32,fp16"
        )
    if "torch_eager" in configs:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "--device cuda: torch cannot use the GPU (a CPU-only torch build?); or leave out torch_eager"
            )


def export_bundles(checkpoint: Path, root: Path, precisions: list[str]) -> dict[str, Path]:
    """The checkpoint as one bundle per precision (verified, as ``textgen export`` makes them), kept under the
    checkpoint's hash: a rerun on the same checkpoint reuses them, another checkpoint never does."""
    from exporter.publish import export_bundle

    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:12]
    bundles = {}
    for precision in precisions:
        out = root / f"bench-{precision}-{digest}" / "1"
        if not (out / "manifest.json").exists():
            export_bundle(checkpoint, out, quantize=None if precision == "fp32" else precision)
        bundles[precision] = out
    return bundles


def prepare(
    checkpoint: Path,
    out_dir: Path,
    precisions: list[str],
    repeats: int,
    max_tokens: int,
    sampling: str,
    device: str,
    configs: list[str],
) -> dict[str, Path]:
    """What every serving bench checks before any work (each refusal names its flag), then its bundles, one per
    precision, under ``out_dir``."""
    stream_settings(sampling, 1)  # an unknown setting fails here, before any export
    unknown = [p for p in precisions if p not in ("fp32", "int8", "fp16")]
    if unknown:
        raise ConfigError(f"--precisions: unknown {', '.join(unknown)} (choose from fp32, int8, fp16)")
    if repeats < 1 or max_tokens < 1:
        raise ConfigError(f"--repeats and --max-tokens must be at least 1 (got {repeats}, {max_tokens})")
    check_device(device, precisions, configs)
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_bundles(checkpoint, out_dir / "bundles", precisions)


def report_head(checkpoint: Path, options: dict[str, Any], repeats: int) -> dict[str, Any]:
    """The facts every serving bench's JSON report starts with: what was measured, how, and on what machine."""
    return {
        "checkpoint": str(checkpoint),
        **{k: v for k, v in options.items() if k != "stream_interval"},
        "repeats": repeats,
        "max_stream_interval": options["stream_interval"],  # None: the server's default
        "sampling_settings": SETTINGS,
        "machine": machine(options["device"]),
        "command": " ".join(["textgen", *sys.argv[1:]]) if sys.argv[0].endswith("textgen") else "",
    }


def rows_by_concurrency(
    precision: str, concurrency: list[int], measure_at: Callable[[int], dict[str, Any]]
) -> list[dict[str, Any]]:
    """``measure_at(c)`` for every C in order, each row's ratios printed as it is measured."""
    rows = []
    for c in concurrency:
        rows.append(measure_at(c))
        print(f"{precision} C={c}: " + json.dumps({k: round(v, 3) for k, v in rows[-1]["ratios"].items()}),
              flush=True)  # fmt: skip
    return rows


def machine(device: str = "cpu") -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "device": device,
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class Subjects:
    """Everything measured on one bundle, opened and warmed up once: sessions for the raw loops, the torch model,
    and the servers (all alive together; only one is driven at a time)."""

    def __init__(self, checkpoint: Path, bundle: Path, precision: str, o: dict[str, Any]) -> None:
        from service.bundle import load_bundle
        from service.models import ModelRegistry
        from service.providers import choose_providers, session_options
        from service.settings import load_settings

        device, sampling, steps, configs = o["device"], o["sampling"], o["max_tokens"], o["configs"]
        providers = [CUDA] if device == "cuda" else [CPU]

        def settings(graphs: bool) -> Any:
            return load_settings(
                bundle=bundle, port=0, providers=providers, intra_op_threads=o["threads"], cuda_graphs=graphs
            )

        capacity = max(o["concurrency"])
        self.runners: dict[str, Runner] = {}
        self.servers: list[ServerProcess] = []
        try:
            if "raw" in configs:  # the plain exported graph, with the server's providers and session options
                s = settings(False)
                plain = load_bundle(bundle, providers=choose_providers(s), session_options=session_options(s))
                self.runners["raw"] = lambda c: raw_graph_loop(plain, row_params(sampling, c), steps, device)
            for name, graphs in (("raw_iobinding", False), ("raw_iobinding_graphs", True)):
                if name in configs:
                    model = next(iter(ModelRegistry.load(settings(graphs))))
                    pool = model.batch_state(capacity)  # one pool, as the engine has: its graphs stay valid
                    self.runners[name] = partial(self._iobinding, model, pool, sampling, steps)
            for name, batch, graphs in (("server", capacity, False), ("server_graphs", capacity, True),
                                        ("server_batch1", 1, False)):  # fmt: skip
                if name in configs:
                    server = ServerProcess(
                        bundle, o["threads"], batch, steps, o["stream_interval"], ",".join(providers), graphs
                    )
                    self.servers.append(server)
                    for c in o["concurrency"]:  # warm-up: first-run allocations, and each C's batch shapes
                        server.drive(requests(sampling, c, WARM_UP_TOKENS))
                    self.runners[name] = partial(self._serve, server, sampling, steps)
            if "torch_eager" in configs:
                torch_model, start = load_torch_model(checkpoint, device, half=device == "cuda" and precision == "fp16")
                self.runners["torch_eager"] = lambda c: torch_eager(torch_model, start, row_params(sampling, c), steps)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _iobinding(model: Any, pool: Any, sampling: str, steps: int, c: int) -> Any:
        return raw_iobinding_loop(model, pool, row_params(sampling, c), steps)

    @staticmethod
    def _serve(server: ServerProcess, sampling: str, max_tokens: int, c: int) -> Any:
        return server.drive(requests(sampling, c, max_tokens))

    def close(self) -> None:
        for server in self.servers:
            server.stop()


def _median(runs: list[Any]) -> Any:
    """The run with the median tokens/s (an actual run, so its latencies belong to it)."""
    return sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]


def ratios(results: dict[str, dict[str, Any]], concurrency: int) -> dict[str, float]:
    """The comparisons the goals are stated in, wherever both sides were measured."""
    out: dict[str, float] = {}

    def put(key: str, num: float | None, den: float | None) -> None:
        if num is not None and den:
            out[key] = num / den

    def get(config: str, field: str) -> float | None:
        return results.get(config, {}).get(field)

    for server in ("server", "server_graphs"):
        for base in ("raw", "raw_iobinding", "raw_iobinding_graphs", "server_batch1", "torch_eager"):
            put(f"{server}_vs_{base}", get(server, "tokens_per_s"), get(base, "tokens_per_s"))
        for base in ("raw", "raw_iobinding", "raw_iobinding_graphs"):
            put(f"{server}_cpu_vs_{base}_cpu", get(server, "server_cpu_ms_per_token"), get(base, "cpu_ms_per_token"))
            if concurrency == 1:
                put(f"{server}_gap_p50_vs_{base}_step", get(server, "gap_p50_ms"), get(base, "step_ms"))
    put("raw_iobinding_vs_raw", get("raw_iobinding", "tokens_per_s"), get("raw", "tokens_per_s"))
    return out


def measure(subjects: Subjects, configs: list[str], c: int, repeats: int, sampling: str) -> dict[str, Any]:
    """``repeats`` rounds at C streams, each running every configuration once in ``configs`` order."""
    runs: dict[str, list[Any]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name in configs:
            runs[name].append(subjects.runners[name](c))
    results = {name: asdict(_median(rs)) for name, rs in runs.items()}
    return {
        "concurrency": c,
        "settings": dict(Counter(stream_settings(sampling, c))),
        "results": results,
        "runs": {name: [r.tokens_per_s for r in rs] for name, rs in runs.items()},
        "ratios": ratios(results, c),
    }


def run_serve_bench(
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
    configs: list[str] | None = None,
) -> dict[str, Any]:
    """Every measurement for every precision; writes ``serve.json`` and the plots into ``out_dir``, prints a table
    per precision."""
    chosen = configurations(device, configs)
    bundles = prepare(checkpoint, out_dir, precisions, repeats, max_tokens, sampling, device, chosen)
    options = {"concurrency": concurrency, "max_tokens": max_tokens, "threads": threads, "sampling": sampling,
               "device": device, "stream_interval": stream_interval, "configs": chosen}  # fmt: skip
    report: dict[str, Any] = {**report_head(checkpoint, options, repeats), "precisions": {}}
    if sampling == MIX:
        first = next(iter(SETTINGS))
        print(f"sampling mix: stream i uses setting i % {len(SETTINGS)} of {', '.join(SETTINGS)}; "
              f"C = 1 uses {first} only", flush=True)  # fmt: skip
    for precision, bundle in bundles.items():
        subjects = Subjects(checkpoint, bundle, precision, options)
        try:
            rows = rows_by_concurrency(
                precision, concurrency, lambda c, s=subjects: measure(s, chosen, c, repeats, sampling)
            )
        finally:
            subjects.close()
        report["precisions"][precision] = rows
        print(table(precision, rows, chosen), flush=True)
    (out_dir / "serve.json").write_text(json.dumps(report, indent=1))
    from bench.plots import plot_serve

    plot_serve(report, out_dir)
    return report


def _server(row: dict[str, Any]) -> str | None:
    """The server configuration whose latencies the table shows: batched (CUDA graphs off first), else batch 1."""
    return next((s for s in ("server", "server_graphs", "server_batch1") if s in row["results"]), None)


def table(precision: str, rows: list[dict[str, Any]], configs: list[str]) -> str:
    """A markdown table of one precision's medians, with the ratios, and the goals' three figures."""
    ratio_keys = [k for k in rows[0]["ratios"] if "_gap_" not in k] if rows else []
    raws = [c for c in configs if c.startswith("raw")]
    head = [
        "C",
        *(f"{LABELS[c]} tok/s" for c in configs),
        *(k.replace("_vs_", " / ") for k in ratio_keys),
        "TTFT p50/p99 ms",
        "gap p50/p99 ms",
        "per-token p50/p99 ms",
        "msgs/stream",
        f"CPU ms/token: {' / '.join(raws)} / server / client",
    ]
    lines = [f"\n{precision}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        res = row["results"]
        s = res.get(_server(row) or "", {})
        cpu = [res[r]["cpu_ms_per_token"] for r in raws] + [s.get("server_cpu_ms_per_token"),
                                                            s.get("client_cpu_ms_per_token")]  # fmt: skip
        cells = [str(row["concurrency"]), *(f"{res[c]['tokens_per_s']:,.0f}" for c in configs),
                 *(f"{row['ratios'].get(k, float('nan')):.3f}" for k in ratio_keys)]  # fmt: skip
        if s:
            cells += [
                f"{s['ttft_p50_ms']:.2f} / {s['ttft_p99_ms']:.2f}",
                f"{s['gap_p50_ms']:.2f} / {s['gap_p99_ms']:.2f}",
                f"{s['itl_p50_ms']:.3f} / {s['itl_p99_ms']:.3f}",
                f"{s['messages_per_stream']:.0f}",
            ]
        else:
            cells += ["-"] * 4
        cells.append(" / ".join("-" if v is None else f"{v:.3f}" for v in cpu))
        lines.append("| " + " | ".join(cells) + " |")
    lines += _goals(rows)
    return "\n".join(lines)


def _goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's three goals, where this run measured them (ratios in one run)."""
    by_c = {row["concurrency"]: row["ratios"] for row in rows}
    out = []
    for c, key, goal in ((64, "server_vs_raw", ">= 0.90"), (1, "server_gap_p50_vs_raw_step", "<= 1.2"),
                         (64, "server_cpu_vs_raw_cpu", "<= 1.1")):  # fmt: skip
        if key in by_c.get(c, {}):
            out.append(f"goal C={c} {key}: {by_c[c][key]:.3f} (goal {goal})")
    for c, key in ((1, "server_gap_p50_vs_raw_iobinding_step"), (64, "server_vs_raw_iobinding")):
        if key in by_c.get(c, {}):
            out.append(f"also C={c} {key}: {by_c[c][key]:.3f}")
    return out
