"""Steps 1 to 4 of the sampling rule (``textgen.sampling``): the repetition penalty, presence and frequency
penalties, logit bias and excluded tokens (banned, not allowed, or outside a constraint's mask), on the logits of the
rows that ask, before temperature.

A row that asks for none of them costs nothing here. The others cost one vectorised pass per kind: one masked
gather and scatter for the repetition penalty, a dense penalty over their count rows (a count of 0 subtracts
exactly 0), one flat scatter for every row's biases and one for every row's banned ids, and a minimum with a
ceiling row for each row with an allowed list (built once per request and vocabulary size, applied with a
branch-free minimum). ``controlled_logits`` applies all four to
one request's rows (beam search ranks what it returns)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from textgen.errors import InvalidInputError

if TYPE_CHECKING:
    from textgen.sampling import SamplingParams

MAX_BIAS = 100.0  # |bias| at most this (OpenAI's range): -100 all but bans a token, +100 all but forces it
_NINF = np.float32(-np.inf)
_TINY = float(np.finfo(np.float32).tiny)


def check_controls(sp: SamplingParams) -> None:
    """The ranges that need no vocabulary (``LogitControls.build`` checks the ids against one)."""
    ids = set()
    for token, bias in sp.logit_bias:
        if token < 0:
            raise InvalidInputError(f"logit_bias[{token}]: not a token id")
        if not (-MAX_BIAS <= bias <= MAX_BIAS):  # (NaN fails too)
            raise InvalidInputError(f"logit_bias[{token}]: the bias must be a number in [-100, 100] (got {bias})")
        if token in ids:
            raise InvalidInputError(f"logit_bias[{token}]: the token has two biases")
        ids.add(token)
    for name in ("allowed_token_ids", "banned_token_ids"):
        given = getattr(sp, name)
        if given and min(given) < 0:
            raise InvalidInputError(f"{name}: {min(given)} is not a token id")
    if sp.allowed_token_ids and set(sp.allowed_token_ids) <= set(sp.banned_token_ids):
        raise InvalidInputError("allowed_token_ids: every allowed token is also banned (banned_token_ids)")


@dataclass(frozen=True)
class LogitControls:
    """One request's bias and exclusion arrays for one vocabulary size."""

    vocab: int
    bias_ids: np.ndarray  # int64, distinct
    bias_values: np.ndarray  # float32
    allowed: np.ndarray  # int64; empty: every token
    banned: np.ndarray  # int64

    @classmethod
    def build(cls, sp: SamplingParams, vocab: int) -> LogitControls:
        for name, ids in (
            ("logit_bias", [t for t, _ in sp.logit_bias]),
            ("allowed_token_ids", sp.allowed_token_ids),
            ("banned_token_ids", sp.banned_token_ids),
        ):
            if ids and max(ids) >= vocab:
                i, token = next((i, t) for i, t in enumerate(ids) if t >= vocab)
                where = f"[{token}]" if name == "logit_bias" else f"[{i}]"
                raise InvalidInputError(f"{name}{where}: {token} is not a token of this model (vocabulary {vocab})")
        return cls(
            vocab,
            np.array([t for t, _ in sp.logit_bias], np.int64),
            np.array([b for _, b in sp.logit_bias], np.float32),
            np.asarray(sp.allowed_token_ids, np.int64),
            np.unique(np.asarray(sp.banned_token_ids, np.int64)),
        )

    @cached_property
    def ceiling(self) -> np.ndarray:
        """float32 [vocab]: -inf for every excluded token, +inf for the others. ``np.minimum(logits, ceiling)``
        excludes exactly (a minimum is branch-free: a masked store on a mask of scattered ids is ten times
        slower)."""
        ceiling = np.full(self.vocab, np.inf, np.float32)
        if self.allowed.size:
            ceiling[:] = -np.inf
            ceiling[self.allowed] = np.inf
        ceiling[self.banned] = -np.inf
        return ceiling


def parameter32(parameter: float) -> np.float32:
    """A temperature or penalty as it meets the logits: float32, at least float32's smallest normal number (one
    that rounded to 0 would turn a logit of 0, or of -inf, into NaN)."""
    return np.float32(max(parameter, _TINY))


def repetition_penalty(
    x: np.ndarray, params: Sequence[SamplingParams], seen: np.ndarray | Sequence[np.ndarray]
) -> None:
    """The repetition penalty, in place, on the seen tokens of the rows that ask for it: one masked gather and
    scatter for the batch (the per-row loop it replaces cost more than the arithmetic)."""
    penalty = [sp.repetition_penalty for sp in params]
    if all(v == 1.0 for v in penalty):
        return
    mask = np.asarray(seen, dtype=bool)
    if 1.0 in penalty:  # rows without a penalty leave their seen tokens alone
        mask = mask & (np.array(penalty) != 1.0)[:, None]
    hit = x[mask]
    factors = {v for v in penalty if v != 1.0}
    by: np.ndarray | np.float32 = (
        parameter32(factors.pop())
        if len(factors) == 1
        else np.broadcast_to(np.array([parameter32(v) for v in penalty])[:, None], x.shape)[mask]
    )
    x[mask] = np.where(hit > 0, hit / by, hit * by)


def adjust(
    x: np.ndarray,
    params: Sequence[SamplingParams],
    rows: list[int],
    counts: np.ndarray | Sequence[np.ndarray | None] | None,
) -> None:
    """Rule steps 2 to 4, in place, on ``rows`` of ``x`` (a C-contiguous float32 ``[batch, vocab]``).
    ``counts[i]``: how often each token was generated by row ``i``'s request (read only where it has a
    presence or frequency penalty)."""
    batch, vocab = x.shape
    penalised = [i for i in rows if params[i].penalises]
    if penalised:
        if counts is None or any(counts[i] is None for i in penalised):
            raise InvalidInputError("presence_penalty, frequency_penalty: no counts of generated tokens given")
        term = np.stack([np.asarray(counts[i], np.float32) for i in penalised])  # the counts, then the penalty
        present = term > 0
        np.multiply(term, np.array([params[i].frequency_penalty for i in penalised], np.float32)[:, None], out=term)
        presence = np.array([params[i].presence_penalty for i in penalised], np.float32)[:, None]
        np.add(term, presence, out=term, where=present)  # (a count of 0 leaves a term of 0: x - 0 is x)
        if len(penalised) == batch:
            x -= term
        else:
            x[penalised] -= term
    bias_at, bias, banned, ceilings = [], [], [], []
    for i in rows:
        sp = params[i]
        if not (sp.logit_bias or sp.allowed_token_ids or sp.banned_token_ids):
            continue
        ctl = sp.controls(vocab)
        if ctl.bias_ids.size:
            bias_at.append(ctl.bias_ids + i * vocab)
            bias.append(ctl.bias_values)
        if ctl.allowed.size:
            ceilings.append((i, ctl.ceiling))
        elif ctl.banned.size:
            banned.append(ctl.banned + i * vocab)
    flat = x.reshape(-1)  # a view: x is contiguous
    if bias_at:
        flat[np.concatenate(bias_at)] += np.concatenate(bias)  # ids are distinct within a row
    if banned:
        flat[np.concatenate(banned)] = _NINF
    for i, ceiling in ceilings:
        np.minimum(x[i], ceiling, out=x[i])


def controlled_logits(
    logits: np.ndarray, params: SamplingParams, seen: np.ndarray | None = None, counts: np.ndarray | None = None
) -> np.ndarray:
    """Rule steps 1 to 4 on every row of ``logits`` [rows, vocab] under one request's ``params``: a float32 copy,
    the logits as the sampler has them before temperature. ``seen`` and ``counts`` per row, as ``sample_batch``
    takes them."""
    x = np.array(logits, dtype=np.float32)
    rows = [params] * x.shape[0]
    with np.errstate(over="ignore"):  # a tiny repetition penalty may overflow a logit to +-inf (rule step 6)
        if seen is not None:
            repetition_penalty(x, rows, seen)
        if params.adjusts:
            adjust(x, rows, list(range(x.shape[0])), counts)
    return x


def apply_masks(x: np.ndarray, masks: Sequence[np.ndarray | None]) -> list[int]:
    """Rule step 4 for the rows with a constraint mask (a +-inf row: a branch-free minimum, as for allowed
    tokens), in place; returns those rows."""
    rows = [i for i, mask in enumerate(masks) if mask is not None]
    for i in rows:
        np.minimum(x[i], masks[i], out=x[i])
    return rows


def exclude_row(row: np.ndarray, sp: SamplingParams, mask: np.ndarray | None = None) -> None:
    """Excluded tokens back to -inf in one row (rule step 6, where a row's every logit was -inf)."""
    if sp.allowed_token_ids or sp.banned_token_ids:
        np.minimum(row, sp.controls(row.size).ceiling, out=row)
    if mask is not None:
        np.minimum(row, mask, out=row)


def greedy_fallback(
    x: np.ndarray,
    picked: np.ndarray,
    params: Sequence[SamplingParams],
    rows: list[int],
    masks: Sequence[np.ndarray | None] | None = None,
) -> None:
    """Rule step 5's exception: a greedy row with exclusions whose every logit is -inf takes its lowest id not
    excluded (the arg-max would be token 0, excluded or not)."""
    for i in rows:
        sp = params[i]
        mask = masks[i] if masks is not None else None
        if sp.greedy and (sp.allowed_token_ids or sp.banned_token_ids or mask is not None) and x[i, picked[i]] == _NINF:
            ceiling = np.full(x.shape[1], np.inf, np.float32)
            exclude_row(ceiling, sp, mask)
            picked[i] = int(np.argmax(ceiling))  # the first +inf: the first not excluded
