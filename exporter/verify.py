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
# An fp16 graph is held to 1 % of the largest |value| torch computes in the parity run (logits and states; at least
# 1, so the bound is never below 0.01). float16 keeps 11 significant bits (4.9e-4 relative rounding) and the state,
# logits and weights are all rounded to it. Measured on the CPU provider: at most 0.07-0.08 % of that largest value
# (trained 2 x 48 and 2 x 256 char LSTMs, largest values 23 and 19, a cell state: differences 1.2e-2 and 8.5e-3, and
# 1.6e-2 in the two-chunk continuation, one float16 step at that size), so 1 % leaves over ten times that, while a
# wrong weight or op is off by the values' own size.
FP16_RELATIVE_TOLERANCE = 1e-2
_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class ParityReport:
    max_abs_logit_diff: float
    continuation_max_abs_diff: float
    scale: float = 1.0  # the largest |value| (logits, states) torch computed in the run
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    lengths: tuple[int, ...] = LENGTHS


def fp16_tolerance(scale: float) -> float:
    """The absolute parity bound of an fp16 graph whose torch values reach ``scale``."""
    return FP16_RELATIVE_TOLERANCE * max(1.0, scale)


def require_parity(report: ParityReport, tolerance: float) -> None:
    worst = max(report.max_abs_logit_diff, report.continuation_max_abs_diff)
    if worst > tolerance:
        raise BundleError(
            f"ONNX Runtime and torch disagree: max abs difference {worst:.2e} exceeds the tolerance {tolerance:.1e}"
        )


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
    """Logits at ``positions`` (all positions if None) and the new state, through ONNX Runtime, as float32: the
    state is fed in the graph's own dtype (float16 for an fp16 graph; float32 -> float16 -> float32 is exact, so a
    returned state fed back is what the graph produced)."""
    inputs = session.get_inputs()[2:]
    if positions is None:
        positions = np.arange(tokens.shape[1], dtype=np.int64)
    feeds = {"tokens": tokens, "positions": positions}
    for spec, value in zip(inputs, state, strict=True):
        feeds[spec.name] = value.astype(_NUMPY_DTYPES[spec.type], copy=False)
    logits, *new_state = session.run(None, feeds)
    return logits.astype(np.float32, copy=False), tuple(s.astype(np.float32, copy=False) for s in new_state)


@torch.no_grad()
def check_parity(
    model: RNNLanguageModel, session: ort.InferenceSession, tolerance: float | None = FP32_TOLERANCE, seed: int = 0
) -> ParityReport:
    """Compare ONNX Runtime with torch on random tokens and random states at several batch sizes and lengths.
    ``tolerance`` None only measures (for a quantised graph, which is judged by its quality change instead, and for
    fp16, whose bound ``fp16_tolerance`` follows the measured scale)."""
    model.eval()
    rng = np.random.default_rng(seed)
    cfg = model.config
    worst = scale = 0.0
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
            scale = max(scale, *(float(t.abs().max()) for t in (ref_logits, *ref_state)))
    continuation = _continuation_diff(
        session, cfg.vocab_size, cfg.num_layers, cfg.hidden_size, len(cfg.state_names), rng
    )
    report = ParityReport(worst, continuation, scale)
    if tolerance is not None:
        require_parity(report, tolerance)
    return report


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
