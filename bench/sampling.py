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


def reference_probabilities(
    logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None = None, counts: np.ndarray | None = None
) -> np.ndarray:
    """Steps 1 to 4 and 6 to 10 of the rule for one sampled row: the unnormalised probabilities the pick reads."""
    with np.errstate(over="ignore"):  # extreme parameters may overflow logits to +-inf, as the rule provides for
        x = _penalised(logits, params, seen, counts)
        vocab = x.size
        if params.temperature != 1.0:
            x = x / np.float32(max(params.temperature, TINY))
        peak = x.max()
        if not np.isfinite(peak):
            x = np.where(x == peak, np.float32(0), np.float32(-np.inf))
            for i in _excluded(params, vocab):
                x[i] = -np.inf
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
        if params.min_p > 0.0:
            p = np.where(p < np.float32(params.min_p), np.float32(0), p)
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
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    seen: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> int:
    """One row, step by step as textgen/sampling.py's docstring states the rule: full sorts, simple loops."""
    if params.temperature == 0.0:  # step 5: no random number
        x = _penalised(logits, params, seen, counts)
        excluded = set(_excluded(params, x.size))
        if excluded and all(x[i] == -np.inf for i in range(x.size) if i not in excluded):
            return min(i for i in range(x.size) if i not in excluded)
        return int(np.argmax(x))
    return reference_pick(reference_probabilities(logits, params, seen, counts), rng.random())


def _penalised(
    logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None, counts: np.ndarray | None = None
) -> np.ndarray:
    """Steps 1 to 4: float32 logits with the repetition penalty applied to the seen tokens, the presence and
    frequency penalties to the generated ones, the biases added and the excluded tokens at -inf."""
    x = np.array(logits, dtype=np.float32)
    with np.errstate(over="ignore"):
        if seen is not None and params.repetition_penalty != 1.0:
            penalty = np.float32(max(params.repetition_penalty, TINY))
            for i in np.flatnonzero(seen):
                x[i] = x[i] / penalty if x[i] > 0 else x[i] * penalty
        if params.presence_penalty or params.frequency_penalty:
            assert counts is not None
            for i in np.flatnonzero(counts):
                c = np.float32(counts[i])
                x[i] = x[i] - (c * np.float32(params.frequency_penalty) + np.float32(params.presence_penalty))
        for i, bias in params.logit_bias:
            x[i] = x[i] + np.float32(bias)
        for i in _excluded(params, x.size):
            x[i] = -np.inf
    return x


def _excluded(params: SamplingParams, vocab: int) -> list[int]:
    """Step 4's excluded tokens: the banned ones, and those outside the allowed list when there is one."""
    if not (params.allowed_token_ids or params.banned_token_ids):
        return []
    allowed, banned = set(params.allowed_token_ids) or set(range(vocab)), set(params.banned_token_ids)
    return [i for i in range(vocab) if i not in allowed or i in banned]


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
    counts: np.ndarray | Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    """``sample_batch``'s contract, one row at a time."""
    return np.array(
        [
            reference_token(
                logits[i], params[i], rngs[i], None if seen is None else seen[i], None if counts is None else counts[i]
            )
            for i in range(len(params))
        ],
        dtype=np.int64,
    )


SETTINGS = {
    "temperature 1": SamplingParams(),
    "top_k 40": SamplingParams(top_k=40),
    "top_p 0.9": SamplingParams(top_p=0.9),
    "repetition 1.3": SamplingParams(repetition_penalty=1.3),
}
SHAPES = ((1, 96), (64, 96), (1, 10_000), (64, 10_000))


def control_settings(vocab: int) -> dict[str, SamplingParams]:
    """The logit controls and min_p, each alone (their cost beside ``temperature 1``): a bias on the server's
    limit of 300 tokens (every token at 96), half the vocabulary allowed, 50 tokens banned."""
    ids = np.random.default_rng(2).permutation(vocab)
    return {
        "min_p 0.05": SamplingParams(min_p=0.05),
        "presence+freq": SamplingParams(presence_penalty=0.5, frequency_penalty=0.5),
        "logit_bias 300": SamplingParams(logit_bias=tuple((int(t), 1.0) for t in ids[:300])),
        "allowed half": SamplingParams(allowed_token_ids=tuple(ids[: vocab // 2].tolist())),
        "banned 50": SamplingParams(banned_token_ids=tuple(ids[:50].tolist())),
    }


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
    logits: np.ndarray,
    params: list[SamplingParams],
    seen: np.ndarray | None,
    budget_s: float,
    min_repeats: int,
    counts: np.ndarray | None = None,
) -> tuple[float, float, int]:
    """Median ms of ``reference_batch`` and of ``sample_batch`` on the same inputs, called alternately (after
    one warm-up call each) until ``budget_s`` has passed and each ran at least ``min_repeats`` times."""
    calls = [
        partial(reference_batch, logits, params, [new_rng(i) for i in range(len(params))], seen, counts),
        partial(sample_batch, logits, params, [new_rng(i) for i in range(len(params))], seen, counts),
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
            counts = np.zeros((batch, vocab), dtype=np.float32)
            for row, row_counts in zip(seen, counts, strict=True):  # about 50 seen (and generated) tokens a row
                row[mask_rng.integers(0, vocab, 50)] = True
                np.add.at(row_counts, mask_rng.integers(0, vocab, 50), 1)
            for name, params in {**SETTINGS, **control_settings(vocab)}.items():
                row_seen = seen if params.repetition_penalty != 1.0 else None
                row_counts = counts if params.penalises else None
                ref_ms, new_ms, repeats = _time_pair(
                    logits, [params] * batch, row_seen, budget_s, min_repeats, row_counts
                )
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
