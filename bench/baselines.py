"""The baselines of ``textgen bench serve``, each at batch C with the clients' own sampling parameters and seeds:

- the raw graph loop: the bundle's exported graph, state fed and fetched as numpy arrays every step;
- the raw IOBinding loop: the service's step graph over a device-resident state pool (``BatchState``, what the
  server's engine runs), with CUDA graphs where the session was opened with them;
- torch eager: the checkpoint's torch model, one forward call per step for all C rows, sampled in torch.

No gRPC, no scheduler, no per-row bookkeeping beyond what sampling needs: the limits the server is held to."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from textgen.sampling import SamplingParams, new_rng, sample_batch

WARM_UP_STEPS = 5


@dataclass
class Timed:
    """How long a loop took for its tokens: the figures every baseline reports."""

    batch: int
    steps: int
    tokens: int
    seconds: float
    step_ms: float
    tokens_per_s: float
    ms_per_token: float
    cpu_ms_per_token: float  # this process's CPU time (ONNX Runtime's or torch's threads included) per token


def _timing(batch: int, steps: int, seconds: float, cpu: float) -> dict[str, Any]:
    tokens = batch * steps
    per_token = {"ms_per_token": seconds / tokens * 1e3, "cpu_ms_per_token": cpu / tokens * 1e3}
    return {"batch": batch, "steps": steps, "tokens": tokens, "seconds": seconds,
            "step_ms": seconds / steps * 1e3, "tokens_per_s": tokens / seconds, **per_token}  # fmt: skip


@dataclass
class RawResult(Timed):
    loop: str  # "graph" (numpy feeds) or "iobinding" (device-resident state)
    device: str
    cuda_graphs: bool


@dataclass
class EagerResult(Timed):
    device: str
    dtype: str
    sampler: str


class Rows:
    """The sampling side of a raw loop, as the server does it per sequence: row i has the parameters of client
    i's request and a generator seeded i, and a seen-token mask holding the start token and every token sampled
    (the repetition penalty reads it; it is passed only when some row uses the penalty, as the engine does)."""

    def __init__(self, params: Sequence[SamplingParams], vocab: int, start_id: int) -> None:
        self.params = list(params)
        self.rngs = [new_rng(i) for i in range(len(self.params))]
        self.penalty = any(p.repetition_penalty != 1.0 for p in self.params)
        self.seen = np.zeros((len(self.params), vocab), bool)
        self.seen[:, start_id] = True
        self._rows = np.arange(len(self.params))

    def sample(self, logits: np.ndarray) -> np.ndarray:
        """One token per row of ``logits`` [batch, vocab], as ``[batch, 1]`` int64 for the next step."""
        tokens = sample_batch(logits, self.params, self.rngs, self.seen if self.penalty else None)
        self.seen[self._rows, tokens] = True
        return tokens.astype(np.int64, copy=False).reshape(-1, 1)


def _timed(step: Callable[[], None], steps: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``steps`` calls."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return time.perf_counter() - start, time.process_time() - cpu


def _raw_result(loop: str, device: str, graphs: bool, batch: int, steps: int, seconds: float, cpu: float) -> RawResult:
    return RawResult(**_timing(batch, steps, seconds, cpu), loop=loop, device=device, cuda_graphs=graphs)


def raw_graph_loop(bundle: Any, params: Sequence[SamplingParams], steps: int, device: str = "cpu") -> RawResult:
    """The exported graph of ``bundle`` (``service.bundle.Bundle``) with numpy feeds: tokens and the whole state
    go in and come out as host arrays every step, then one vectorised sampling pass."""
    m = bundle.manifest
    names = list(m.graph.state)
    dtype = np.dtype({t.name: t.dtype for t in m.graph.inputs}[names[0]])
    shape = (m.model.num_layers, len(params), m.model.hidden_size)
    outputs = ["logits", *(f"{s}_out" for s in names)]
    start = bundle.tokenizer.start_id
    feeds: dict[str, np.ndarray] = {}
    rows = Rows(params, m.model.vocab_size, start)

    def reset() -> None:
        nonlocal rows
        feeds.update({"tokens": np.full((len(params), 1), start, np.int64), "positions": np.zeros(1, np.int64)})
        feeds.update({s: np.zeros(shape, dtype) for s in names})
        rows = Rows(params, m.model.vocab_size, start)

    def step() -> None:
        logits, *state = bundle.session.run(outputs, feeds)
        feeds.update(zip(names, state, strict=True))
        feeds["tokens"] = rows.sample(logits[:, 0])

    reset()
    for _ in range(WARM_UP_STEPS):
        step()
    reset()  # the measured run samples exactly the clients' streams, from the start token
    seconds, cpu = _timed(step, steps)
    return _raw_result("graph", device, False, len(params), steps, seconds, cpu)


def raw_iobinding_loop(model: Any, pool: Any, params: Sequence[SamplingParams], steps: int) -> RawResult:
    """The service's step graph over ``pool`` (``model.batch_state(capacity)``, reused across runs: under CUDA
    graphs each batch-size bucket's captured graph points at the pool's buffers), rows in slots 0..C-1 as the
    engine holds them: only token ids go in and logits come out each step."""
    batch = len(params)
    slots = np.arange(batch, dtype=np.int64)
    start = model.tokenizer.start_id
    tokens = np.full(batch, start, np.int64)
    rows = Rows(params, model.vocab_size, start)

    def reset() -> None:
        nonlocal tokens, rows
        pool.put(list(range(batch)), model.zero_state(batch))
        tokens = np.full(batch, start, np.int64)
        rows = Rows(params, model.vocab_size, start)

    def step() -> None:
        nonlocal tokens
        tokens = rows.sample(pool.decode(tokens, slots)).reshape(-1)

    reset()
    for _ in range(WARM_UP_STEPS):
        step()
    reset()
    seconds, cpu = _timed(step, steps)
    sessions = model.sessions
    return _raw_result("iobinding", sessions.device, bool(sessions.cuda_graphs), batch, steps, seconds, cpu)


TORCH_SAMPLER = "torch: repetition penalty, temperature, top-k (topk), top-p (full sort), torch.multinomial"


class TorchSampler:
    """What a user of the torch model would write to sample with these per-row parameters (the usual logits
    processors, vectorised over the batch; rows without a filter skip it by mask). One generator for the batch:
    the draws differ from textgen's rule, the work does not."""

    def __init__(self, params: Sequence[SamplingParams], vocab: int, start_id: int, device: str) -> None:
        import torch

        def column(values: list[float]) -> Any:
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

        n = len(params)
        self.temperature = column([p.temperature for p in params])
        penalties = [p.repetition_penalty for p in params]
        self.penalty = column(penalties) if any(v != 1.0 for v in penalties) else None
        ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        self.k = max(ks)
        self.k_rows = torch.tensor([k > 0 for k in ks], device=device)[:, None]
        self.k_index = torch.tensor([max(k, 1) - 1 for k in ks], device=device)[:, None]
        top_p = [p.top_p for p in params]
        self.top_p = column(top_p) if any(v < 1.0 for v in top_p) else None
        self.p_rows = torch.tensor([v < 1.0 for v in top_p], device=device)[:, None]
        self.seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
        self.seen[:, start_id] = True
        self.generator = torch.Generator(device=device).manual_seed(0)

    def __call__(self, logits: Any) -> Any:
        import torch

        x = logits.float()
        if self.penalty is not None:
            x = torch.where(self.seen, torch.where(x > 0, x / self.penalty, x * self.penalty), x)
        x = x / self.temperature
        if self.k:
            kth = torch.topk(x, self.k, dim=1).values.gather(1, self.k_index)
            x = x.masked_fill(self.k_rows & (x < kth), float("-inf"))
        if self.top_p is not None:
            ordered, index = torch.sort(x, dim=1, descending=True)
            probs = torch.softmax(ordered, dim=1)
            drop = self.p_rows & (probs.cumsum(dim=1) - probs > self.top_p)  # keep up to the one reaching top_p
            x = x.scatter(1, index, ordered.masked_fill(drop, float("-inf")))
        tokens = torch.multinomial(torch.softmax(x, dim=1), 1, generator=self.generator)
        self.seen.scatter_(1, tokens, True)
        return tokens


def torch_eager(model: Any, start_id: int, params: Sequence[SamplingParams], steps: int) -> EagerResult:
    """What a user would write instead of a server, batched like it: the checkpoint's torch model (already on its
    device and dtype), one forward call per step for all C rows, ``TorchSampler``, and the tokens brought to the
    host every step as any streaming loop does."""
    import torch

    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    batch = len(params)
    vocab = model.config.vocab_size
    state: Any = None
    x: Any = None
    sampler: TorchSampler | None = None

    def reset() -> None:
        nonlocal state, x, sampler
        state = tuple(s.to(dtype) for s in model.init_state(batch, device))
        x = torch.full((batch, 1), start_id, dtype=torch.int64, device=device)
        sampler = TorchSampler(params, vocab, start_id, device.type)

    def step() -> None:
        nonlocal state, x
        assert sampler is not None
        logits, state = model(x, state)
        x = sampler(logits[:, -1])
        x.cpu()

    with torch.inference_mode():
        reset()
        for _ in range(WARM_UP_STEPS):
            step()
        reset()
        seconds, cpu = _timed(step, steps)
    timing = _timing(batch, steps, seconds, cpu)
    return EagerResult(**timing, device=device.type, dtype=str(dtype).removeprefix("torch."), sampler=TORCH_SAMPLER)


def load_torch_model(checkpoint: Any, device: str, half: bool) -> tuple[Any, int]:
    """The checkpoint's torch model in eval mode on ``device`` (float16 with ``half``), and its start token."""
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    model, tokenizer = model_from_checkpoint(load_checkpoint(checkpoint))
    model = model.to(device)
    if half:
        model = model.half()
    return model.eval(), tokenizer.start_id
