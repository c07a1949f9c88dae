"""The benchmark plots (matplotlib, written as PNG next to the JSON they are drawn from)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _decorate(ax: Any, cs: list[int], **labels: str) -> None:
    """Log-log axes over the concurrency values, with a grid and a legend."""
    ax.set(xscale="log", yscale="log", xlabel="concurrent streams", **labels)
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _save(plt: Any, fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_serve(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Throughput vs concurrency (textgen, raw engine, batch-1 server, torch eager) and latency percentiles, one
    pair of plots per precision."""
    plt = _pyplot()
    written = []
    eager = report["torch_eager"]["tokens_per_s"]
    for precision, rows in report["precisions"].items():
        cs = [r["concurrency"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(cs, [r["raw"]["tokens_per_s"] for r in rows], "k--o", label="raw engine loop (no gRPC)")
        ax.plot(cs, [r["server"]["tokens_per_s"] for r in rows], "b-o", label="textgen serve")
        ax.plot(cs, [r["server_batch1"]["tokens_per_s"] for r in rows], "r-s", label="textgen, max batch 1")
        ax.axhline(eager, color="g", linestyle=":", label="PyTorch eager loop")
        _decorate(ax, cs, ylabel="tokens/s (all streams)", title=f"Throughput, {precision}")
        written.append(_save(plt, fig, out_dir / f"serve-throughput-{precision}.png"))

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
        for key, style in (("p50", "-o"), ("p99", "--o")):
            left.plot(cs, [r["server"][f"ttft_{key}_ms"] for r in rows], style, label=f"time to first token {key}")
            right.plot(cs, [r["server"][f"itl_{key}_ms"] for r in rows], style, label=f"inter-token {key}")
        right.plot(cs, [r["raw"]["step_ms"] for r in rows], "k:", label="raw engine step")
        for ax, title in ((left, "Time to first token"), (right, "Inter-token latency")):
            _decorate(ax, cs, ylabel="ms", title=f"{title}, {precision}")
        written.append(_save(plt, fig, out_dir / f"serve-latency-{precision}.png"))
    return written


def _smoothed(points: list[tuple[int, float]], target: int = 200) -> tuple[list[int], list[float]]:
    """Training losses logged every few steps, averaged over consecutive windows down to about ``target``
    points: the raw log of a long run is mostly batch-to-batch noise."""
    size = max(1, len(points) // target)
    steps, losses = [], []
    for i in range(0, len(points) - size + 1, size):
        window = points[i : i + size]
        steps.append(window[-1][0])
        losses.append(sum(loss for _, loss in window) / size)
    return steps, losses


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Training and validation loss against step, from ``metrics.jsonl`` records, one colour per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, records) in enumerate(runs.items()):
        colour = f"C{i}"
        train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            steps, losses = _smoothed(train)
            ax.plot(steps, losses, color=colour, alpha=0.6, label=f"{name} train")
        if val:
            ax.plot(*zip(*val, strict=True), "o-", color=colour, label=f"{name} validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)
