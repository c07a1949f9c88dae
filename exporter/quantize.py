"""Reduced-precision variants of the fp32 graph, and their quality change measured against it on held-out text of
the model's own data.

int8: ONNX Runtime dynamic quantization (weights int8, activations quantized on the fly: the LSTM becomes
``DynamicQuantizeLSTM``, the decoder ``MatMulInteger``), CPU kernels.

fp16: every float tensor in float16 (onnxconverter-common), the state inputs and outputs and the logits included,
for the GPU, where cuDNN's LSTM and cuBLAS run in half precision. No op is kept in float32: the LSTMs are most of
the work. ONNX Runtime's CPU provider has no float16 LSTM or MatMul kernel on x86; it inserts the casts itself and
computes those nodes in float32 from the float16 values, so the bundle loads and is verified on a CPU-only machine.
It is no faster there (measured, one thread: a 2 x 256 char LSTM at 1.00-1.08x the fp32 time for a decode step at
batch 1, 8, 64 and a 256-token prompt; a 2 x 650 word LSTM with 10k words at 0.96-1.20x): on the CPU serve fp32 or
int8. The file is half the size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime.quantization
from onnxruntime.quantization import QuantType, quantize_dynamic

from exporter.verify import run_graph
from textgen.tokenizer import Level

_QUANTIZATION_PACKAGE = Path(onnxruntime.quantization.__file__).parent


class _QuantizationAdvice(logging.Filter):
    """Drops ONNX Runtime quantization's records below ERROR. It logs through the root logger itself
    (``logging.warning(...)``), so no logger of its own can be quieted; the records are told apart by the file
    that made them, and everyone else's root-logger records pass untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not Path(record.pathname).is_relative_to(_QUANTIZATION_PACKAGE)


@contextlib.contextmanager
def _quiet_quantization_advice() -> Iterator[None]:
    """While quantizing: no quantization advice below ERROR (e.g. to run shape-inference pre-processing first,
    which changes nothing for these graphs: quantize_dynamic finds the LSTM and MatMul weights without it).
    Scoped to this call: the root logger's level is never touched, and the filter and level are undone after."""
    root, named = logging.getLogger(), logging.getLogger(onnxruntime.quantization.__name__)
    quiet, level = _QuantizationAdvice(), named.level
    root.addFilter(quiet)
    named.setLevel(logging.ERROR)  # the modules that do log through named loggers (onnxruntime.quantization.*)
    try:
        yield
    finally:
        root.removeFilter(quiet)
        named.setLevel(level)


def quantize_int8(onnx_bytes: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_bytes)
        with _quiet_quantization_advice():
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def convert_fp16(onnx_bytes: bytes) -> bytes:
    """The graph with every float tensor, its inputs and outputs included, in float16."""
    from onnxconverter_common.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        # It reports each weight below float16's normal range that it rounds to 1e-7: harmless for these models,
        # whose parity is then checked; one warning per weight would bury the export's own output.
        warnings.filterwarnings("ignore", message="the float32 number .* will be truncated to", category=UserWarning)
        model = convert_float_to_float16(onnx.load_from_string(onnx_bytes), keep_io_types=False)
    return model.SerializeToString()


def _stream_loss(session: ort.InferenceSession, stream: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token losses and arg-max predictions over ``stream`` [batch, length], state carried."""
    batch = stream.shape[0]
    state_inputs = session.get_inputs()[2:]
    state = tuple(np.zeros((i.shape[0], batch, i.shape[2]), np.float32) for i in state_inputs)
    losses, argmax = [], []
    for start in range(0, stream.shape[1] - 1, window):
        x = stream[:, start : min(start + window, stream.shape[1] - 1)]
        y = stream[:, start + 1 : start + 1 + x.shape[1]]
        logits, state = run_graph(session, x, state, None)
        logits = logits.astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logz = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
        losses.append(logz - np.take_along_axis(logits, y[..., None], -1)[..., 0])
        argmax.append(logits.argmax(-1))
    return np.concatenate(losses, 1), np.concatenate(argmax, 1)


def measure_quality(
    ckpt: dict[str, Any],
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    max_tokens: int,
    split: str = "valid",
    batch: int = 10,
    window: int = 256,
) -> dict[str, Any]:
    """Loss, bpc/perplexity and top-1 agreement of ``candidate`` vs ``reference`` on the checkpoint's held-out
    split (its first ``max_tokens`` tokens)."""
    from training.run import corpus_for_checkpoint

    corpus = corpus_for_checkpoint(ckpt)
    ids = corpus.split(split).numpy()[:max_tokens]
    batch = max(1, min(batch, len(ids) // 2))
    length = len(ids) // batch
    stream = ids[: batch * length].reshape(batch, length)
    ref_loss, ref_top = _stream_loss(reference, stream, window)
    loss, top = _stream_loss(candidate, stream, window)
    level = corpus.tokenizer.level

    def metric(x: float) -> float:
        return x / math.log(2) if level is Level.CHAR else math.exp(x)

    ref_mean, mean = float(ref_loss.mean()), float(loss.mean())
    return {
        "reference_precision": "fp32",
        "split": split,
        "tokens": int(ref_loss.size),
        "reference_loss": ref_mean,
        "loss": mean,
        "loss_delta": mean - ref_mean,
        "reference_metric": metric(ref_mean),
        "metric": metric(mean),
        "metric_name": "bpc" if level is Level.CHAR else "perplexity",
        "top1_agreement": float((ref_top == top).mean()),
    }
