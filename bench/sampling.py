"""``textgen bench sampling``: ``textgen.sampling.sample_batch`` against a plain per-row implementation of the same
rule, which the tests also hold it to token for token: the same float32 operations in the rule's order, with full
sorts and simple loops instead of candidate sets, rounds and vectorisation."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from textgen import sampling as rule
from textgen.sampling import SamplingParams, new_rng, sample_batch

TINY = float(np.finfo(np.float32).tiny)  # the least temperature or penalty, as the rule says


def reference_probabilities(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None = None) -> np.ndarray:
    """Steps 1 and 3 to 6 of the rule for one sampled row: the unnormalised probabilities the pick reads."""
    with np.errstate(over="ignore"):  # extreme parameters may overflow logits to +-inf, as the rule provides for
        x = _penalised(logits, params, seen)
        vocab = x.size
        if params.temperature != 1.0:
            x = x / np.float32(max(params.temperature, TINY))
        peak = x.max()
        if not np.isfinite(peak):
            x = np.where(x == peak, np.float32(0), np.float32(-np.inf))
            peak = np.float32(0)
        if 0 < params.top_k < vocab:
            kth = np.sort(x)[vocab - params.top_k]
            x = np.where(x >= kth, x, np.float32(-np.inf))
        p = np.exp(x - peak)
        if params.top_p < 1.0:
            goal = np.float32(params.top_p) * _running(p)[-1]
            keep = np.zeros(vocab, dtype=bool)
            mass = np.float32(0)
            for i in np.argsort(-p, kind="stable"):  # most probable first, lower id first among equals
                keep[i] = True
                mass = mass + p[i]
                if mass >= goal:
                    break
            p = np.where(keep, p, np.float32(0))
        return p


def reference_pick(p: np.ndarray, u: float) -> int:
    """Step 7: the two-level inverse CDF, token by token."""
    block, vocab = rule.BLOCK, p.size
    running = _running(p)
    t = u * float(running[-1])
    chosen = len(running) - 1  # where no block's running sum exceeds t (u * total rounded up to the total)
    for b, total in enumerate(running):
        if float(total) > t:
            chosen = b
            before = float(running[b - 1]) if b else 0.0
            q = np.float32(0)
            for i in range(b * block, min(vocab, (b + 1) * block)):
                q = q + p[i]
                if before + float(q) > t:
                    return i
            break
    for i in range(min(vocab, (chosen + 1) * block) - 1, -1, -1):  # rounding left no token: the last with p > 0
        if p[i] > 0:
            return i
    return 0


def reference_token(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: np.ndarray | None = None
) -> int:
    """One row, step by step as textgen/sampling.py's docstring states the rule: full sorts, simple loops."""
    if params.temperature == 0.0:
        return int(np.argmax(_penalised(logits, params, seen)))  # step 2: no random number
    return reference_pick(reference_probabilities(logits, params, seen), rng.random())


def _penalised(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None) -> np.ndarray:
    """Step 1: float32 logits with the repetition penalty applied to the seen tokens."""
    x = np.array(logits, dtype=np.float32)
    if seen is not None and params.repetition_penalty != 1.0:
        penalty = np.float32(max(params.repetition_penalty, TINY))
        with np.errstate(over="ignore"):
            for i in np.flatnonzero(seen):
                x[i] = x[i] / penalty if x[i] > 0 else x[i] * penalty
    return x


def _running(p: np.ndarray) -> list[np.float32]:
    """The running sum of the block sums (numpy's sum of each block, as the rule says)."""
    out, total = [], np.float32(0)
    for start in range(0, p.size, rule.BLOCK):
        total = total + np.add.reduce(p[start : start + rule.BLOCK])
        out.append(total)
    return out


def reference_batch(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
    seen: np.ndarray | Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """``sample_batch``'s contract, one row at a time."""
    return np.array(
        [reference_token(logits[i], params[i], rngs[i], None if seen is None else seen[i]) for i in range(len(params))],
        dtype=np.int64,
    )


SETTINGS = {
    "temperature 1": SamplingParams(),
    "top_k 40": SamplingParams(top_k=40),
    "top_p 0.9": SamplingParams(top_p=0.9),
    "repetition 1.3": SamplingParams(repetition_penalty=1.3),
}
SHAPES = ((1, 96), (64, 96), (1, 10_000), (64, 10_000))


def bench_logits(batch: int, vocab: int, kind: str, seed: int = 0) -> np.ndarray:
    """``normal``: N(0, 3^2) logits; ``peaked``: the same with every other row led by one token 12 above the rest
    (a confident model: a nucleus of a token or two, where ``normal`` needs hundreds at 10,000 tokens)."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((batch, vocab)).astype(np.float32) * 3
    if kind == "peaked":
        rows = np.arange(0, batch, 2)
        logits[rows, rng.integers(0, vocab, rows.size)] = logits[rows].max(axis=1) + 12
    return logits


def _time_pair(
    logits: np.ndarray, params: list[SamplingParams], seen: np.ndarray | None, budget_s: float, min_repeats: int
) -> tuple[float, float, int]:
    """Median ms of ``reference_batch`` and of ``sample_batch`` on the same inputs, called alternately (after
    one warm-up call each) until ``budget_s`` has passed and each ran at least ``min_repeats`` times."""
    calls = [
        partial(reference_batch, logits, params, [new_rng(i) for i in range(len(params))], seen),
        partial(sample_batch, logits, params, [new_rng(i) for i in range(len(params))], seen),
    ]
    for call in calls:
        call()
    times: list[list[float]] = [[], []]
    deadline = time.perf_counter() + budget_s
    while len(times[1]) < min_repeats or (time.perf_counter() < deadline and len(times[1]) < 1000):
        for call, spent in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            spent.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1]), len(times[1])


def run_sampling_bench(out: Path, budget_s: float = 0.25, min_repeats: int = 5) -> dict[str, Any]:
    """``sample_batch`` against ``reference_batch`` for every distribution, shape and setting (about
    ``budget_s`` a cell). Prints a table and writes ``sampling.json`` into ``out``."""
    rows = []
    for kind in ("normal", "peaked"):
        for batch, vocab in SHAPES:
            logits = bench_logits(batch, vocab, kind)
            mask_rng = np.random.default_rng(1)
            seen = np.zeros((batch, vocab), dtype=bool)
            for row in seen:  # about 50 seen tokens a row (fewer distinct ones at 96)
                row[mask_rng.integers(0, vocab, 50)] = True
            for name, params in SETTINGS.items():
                row_seen = seen if params.repetition_penalty != 1.0 else None
                ref_ms, new_ms, repeats = _time_pair(logits, [params] * batch, row_seen, budget_s, min_repeats)
                rows.append(
                    {
                        "logits": kind,
                        "batch": batch,
                        "vocab": vocab,
                        "setting": name,
                        "reference_ms": ref_ms,
                        "sample_batch_ms": new_ms,
                        "speedup": ref_ms / new_ms,
                        "repeats": repeats,
                    }
                )
    print(f"{'logits':<7} {'shape':>9} {'setting':<15} {'reference ms':>12} {'sample_batch ms':>15} {'speedup':>8}")
    for r in rows:
        shape = f"{r['batch']}x{r['vocab']}"
        print(
            f"{r['logits']:<7} {shape:>9} {r['setting']:<15} {r['reference_ms']:>12.3f} "
            f"{r['sample_batch_ms']:>15.3f} {r['speedup']:>7.1f}x"
        )
    report = {"numpy": np.__version__, "budget_s": budget_s, "results": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
