"""Checks an exported graph must pass before its bundle is published: the ONNX checker, ONNX Runtime vs
torch parity on random batches, and state continuation (a text run in two chunks equals one run)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

from textgen.errors import BundleError
from training.model import RNNLanguageModel

BATCH_SIZES = (1, 3, 8)
LENGTHS = (1, 7, 33)
FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityReport:
    max_abs_logit_diff: float
    continuation_max_abs_diff: float
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    lengths: tuple[int, ...] = LENGTHS


def check_graph(onnx_bytes: bytes) -> None:
    try:
        onnx.checker.check_model(onnx.load_from_string(onnx_bytes), full_check=True)
    except Exception as exc:  # checker and shape inference raise several types
        raise BundleError(f"the exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None


def cpu_session(onnx_bytes: bytes, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def run_graph(
    session: ort.InferenceSession, tokens: np.ndarray, state: tuple[np.ndarray, ...], positions: np.ndarray | None
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Logits at ``positions`` (all positions if None) and the new state, through ONNX Runtime."""
    names = [i.name for i in session.get_inputs()]
    if positions is None:
        positions = np.arange(tokens.shape[1], dtype=np.int64)
    feeds = {"tokens": tokens, "positions": positions, **dict(zip(names[2:], state, strict=True))}
    logits, *new_state = session.run(None, feeds)
    return logits, tuple(new_state)


@torch.no_grad()
def check_parity(
    model: RNNLanguageModel, session: ort.InferenceSession, tolerance: float | None = FP32_TOLERANCE, seed: int = 0
) -> ParityReport:
    """Compare ONNX Runtime with torch on random tokens and random states at several batch sizes and lengths.
    ``tolerance`` None only measures (for a quantised graph, which is judged by its quality change instead)."""
    model.eval()
    rng = np.random.default_rng(seed)
    cfg = model.config
    worst = 0.0
    for batch in BATCH_SIZES:
        for length in LENGTHS:
            tokens = rng.integers(0, cfg.vocab_size, (batch, length), dtype=np.int64)
            state = tuple(
                (rng.standard_normal((cfg.num_layers, batch, cfg.hidden_size)) * 0.5).astype(np.float32)
                for _ in cfg.state_names
            )
            ref_logits, ref_state = model(torch.from_numpy(tokens), tuple(torch.from_numpy(s) for s in state))
            logits, new_state = run_graph(session, tokens, state, None)
            last, _ = run_graph(session, tokens, state, np.array([length - 1], dtype=np.int64))
            diffs = [np.abs(logits - ref_logits.numpy()).max(), np.abs(last[:, 0] - logits[:, -1]).max()]
            diffs += [np.abs(a - b.numpy()).max() for a, b in zip(new_state, ref_state, strict=True)]
            worst = max(worst, *map(float, diffs))
    continuation = _continuation_diff(
        session, cfg.vocab_size, cfg.num_layers, cfg.hidden_size, len(cfg.state_names), rng
    )
    if tolerance is not None and max(worst, continuation) > tolerance:
        raise BundleError(
            f"ONNX Runtime and torch disagree: max abs difference {max(worst, continuation):.2e} "
            f"exceeds the tolerance {tolerance:.0e}"
        )
    return ParityReport(worst, continuation)


def _continuation_diff(
    session: ort.InferenceSession, vocab: int, layers: int, hidden: int, n_state: int, rng: np.random.Generator
) -> float:
    """A text run in one call vs in two calls with the state carried: logits and final state must agree."""
    tokens = rng.integers(0, vocab, (2, 40), dtype=np.int64)
    zero = tuple(np.zeros((layers, 2, hidden), np.float32) for _ in range(n_state))
    whole, whole_state = run_graph(session, tokens, zero, None)
    first, state = run_graph(session, tokens[:, :17], zero, None)
    second, chunk_state = run_graph(session, tokens[:, 17:], state, None)
    diffs = [np.abs(np.concatenate([first, second], 1) - whole).max()]
    diffs += [np.abs(a - b).max() for a, b in zip(chunk_state, whole_state, strict=True)]
    return float(max(diffs))
