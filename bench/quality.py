"""``textgen bench quality``: a checkpoint's held-out loss, and the same text scored through a real server by its
exported fp32 and int8 bundles (the ``Score`` RPC), so a bundle's quality is shown equal to the checkpoint's and
the int8 change is a measured number. The text is the start of the checkpoint's own validation (or test) split,
read as one stream from the start token, exactly as ``Score`` reads it."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from textgen.errors import DataError


def torch_loss(checkpoint: Path, ids: Any) -> float:
    """Mean cross-entropy of ``ids`` after the start token, one stream, in the checkpoint's torch model."""
    import torch
    import torch.nn.functional as F

    from training.checkpoint import load_checkpoint, model_from_checkpoint

    model, tokenizer = model_from_checkpoint(load_checkpoint(checkpoint))
    model.eval()
    targets = torch.as_tensor(ids, dtype=torch.int64)
    feed = torch.cat([torch.tensor([tokenizer.start_id]), targets[:-1]]).unsqueeze(0)
    with torch.inference_mode():
        logits, _ = model(feed, model.init_state(1))
    return float(F.cross_entropy(logits[0].double(), targets, reduction="mean"))


def block_loss(checkpoint: Path, ids: Any, block: int) -> float:
    """Mean loss over independent ``block``-token windows, each read from a zero state and predicting every
    position after its first: nanoGPT's evaluation protocol (context never crosses a window), as opposed to the
    state carried through the whole split that ``textgen train`` and ``Score`` use."""
    import torch
    import torch.nn.functional as F

    from training.checkpoint import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    model.eval()
    t = torch.as_tensor(ids, dtype=torch.int64)
    n = (t.numel() - 1) // block
    x = t[: n * block].view(n, block)
    y = t[1 : n * block + 1].view(n, block)
    total = 0.0
    with torch.inference_mode():
        for rows in torch.split(torch.arange(n), 64):
            logits, _ = model(x[rows], model.init_state(rows.numel()))
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), y[rows].reshape(-1), reduction="sum")
            )
    return total / (n * block)


def run_quality_bench(
    checkpoint: Path, out_dir: Path, split: str, tokens: int, precisions: list[str], block: int = 0
) -> dict:
    from bench.serve import export_bundles
    from service.server import BackgroundServer
    from service.settings import load_settings
    from textgen.client import Client
    from training.checkpoint import load_checkpoint
    from training.run import corpus_for_checkpoint

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(checkpoint)
    corpus = corpus_for_checkpoint(ckpt)
    source = corpus.split(split)
    if source.numel() < 2:
        raise DataError(f"--split: the checkpoint's run has no {split} split")
    ids = source[:tokens].numpy()
    text = corpus.tokenizer.decode(ids)
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "split": split, "tokens": int(ids.size)}
    start = time.perf_counter()
    report["torch_loss"] = torch_loss(checkpoint, ids)
    if block:
        whole = source.numpy()  # the whole split, as nanoGPT evaluates
        report["block_loss"] = {"block": block, "tokens": int(whole.size), "loss": block_loss(checkpoint, whole, block)}
        print(
            f"independent {block}-token blocks over the whole {split} split: loss "
            f"{report['block_loss']['loss']:.5f} nats/token",
            flush=True,
        )
    bundles = export_bundles(checkpoint, out_dir / "bundles", precisions)
    settings = load_settings(
        model_repository=out_dir / "bundles",
        port=0,
        providers=["CPUExecutionProvider"],
        max_prompt_tokens=max(16384, int(ids.size) + 16),
        log_level="warning",
    )
    server = BackgroundServer(settings)
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=600) as client:
            for precision, bundle in bundles.items():
                reply = client.score(text, model=bundle.parent.name)
                if reply.token_count != ids.size:  # the text did not round-trip through the tokenizer
                    raise DataError(f"the server read {reply.token_count} tokens where the checkpoint has {ids.size}")
                report[precision] = {"loss": reply.loss, "delta_vs_torch": reply.loss - report["torch_loss"]}
    finally:
        server.stop()
    report["seconds"] = time.perf_counter() - start
    level = corpus.tokenizer.level.value
    for key in ("torch", *precisions):
        loss = report["torch_loss"] if key == "torch" else report[key]["loss"]
        extra = f"bpc {loss / math.log(2):.4f}" if level == "char" else f"perplexity {math.exp(loss):.2f}"
        print(f"{key}: loss {loss:.5f} nats/token, {extra}", flush=True)
    (out_dir / "quality.json").write_text(json.dumps(report, indent=1))
    return report
