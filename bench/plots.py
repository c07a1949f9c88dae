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
    """Throughput vs concurrency of every configuration measured (servers, raw loops, torch eager), and the
    server's client-side latencies beside the raw step, one pair of plots per precision."""
    from bench.serve import LABELS

    plt = _pyplot()
    written = []
    styles = {"raw": "k--o", "raw_iobinding": "k:s", "raw_iobinding_graphs": "k-.^", "server": "b-o",
              "server_graphs": "c-^", "server_batch1": "r-s", "torch_eager": "g:o"}  # fmt: skip
    for precision, rows in report["precisions"].items():
        cs = [r["concurrency"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for config in report["configs"]:
            ax.plot(cs, [r["results"][config]["tokens_per_s"] for r in rows], styles[config], label=LABELS[config])
        _decorate(ax, cs, ylabel="tokens/s (all streams)", title=f"Throughput, {precision}")
        written.append(_save(plt, fig, out_dir / f"serve-throughput-{precision}.png"))

        server = next((s for s in ("server", "server_graphs", "server_batch1") if s in report["configs"]), None)
        if server is None:
            continue
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
        for key, style in (("p50", "-o"), ("p99", "--o")):
            left.plot(
                cs, [r["results"][server][f"ttft_{key}_ms"] for r in rows], style, label=f"time to first token {key}"
            )
            right.plot(
                cs, [r["results"][server][f"gap_{key}_ms"] for r in rows], style, label=f"between messages {key}"
            )
        right.plot(cs, [r["results"][server]["itl_p50_ms"] for r in rows], "-x", label="per token p50 (amortised)")
        for raw, style in (("raw", "k:"), ("raw_iobinding", "k-.")):
            if raw in report["configs"]:
                right.plot(cs, [r["results"][raw]["step_ms"] for r in rows], style, label=f"{LABELS[raw]} step")
        for ax, title in ((left, "Time to first token"), (right, "Client-side gaps")):
            _decorate(ax, cs, ylabel="ms", title=f"{title}, {precision} ({LABELS[server]})")
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
