"""``textgen bench train``: training tokens/s of ``textgen train`` against a minimal hand-written PyTorch loop on
the same model, from the same initial weights, and the same token stream (what a user would write from the
PyTorch word-language-model example: embedding, ``nn.LSTM``, linear head, truncated BPTT, clipping, the same
optimizer). Measured alternately, each twice, in the same run; the best of each is compared, so a burst of noise
on the shared machine counts against neither."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: The benchmark's models: the serving benchmark's char model and the Zaremba "small" word model.
PRESETS: dict[str, dict[str, Any]] = {
    "char-2x512": {
        "model": {"hidden_size": 512, "num_layers": 2, "dropout": 0.2},
        "data": {"path": "tinyshakespeare/input.txt", "split": (0.9, 0.1, 0.0)},
        "train": {"batch_size": 32, "bptt": 128},
    },
    "word-2x200": {
        "model": {"hidden_size": 200, "num_layers": 2},
        "data": {"path": "ptb", "level": "word"},
        "train": {"batch_size": 20, "bptt": 35},
    },
}


@dataclass
class TrainSpeed:
    tokens: int
    seconds: float
    tokens_per_s: float


def textgen_train(preset: dict[str, Any], data_root: Path, steps: int, run_dir: Path) -> tuple[TrainSpeed, Path]:
    """``textgen train`` itself (``run_train``, what the CLI calls): its own tokens/s, evaluation excluded."""
    from training.run import run_train

    data = {**preset["data"], "path": str(data_root / preset["data"]["path"])}
    train = {**preset["train"], "max_steps": steps, "eval_every": steps, "log_every": 10}
    result = run_train(preset["model"], data, train, run_dir, progress=False)
    tokens = steps * preset["train"]["batch_size"] * preset["train"]["bptt"]
    return TrainSpeed(tokens, tokens / result.train_tokens_per_s, result.train_tokens_per_s), run_dir / "last.pt"


def _initial_weights(model_config: dict[str, Any], seed: int) -> dict[str, Any]:
    """``textgen train``'s initial weights for this configuration, named as the minimal loop names them."""
    import torch

    from training.model import ModelConfig, RNNLanguageModel

    torch.manual_seed(seed)  # as `train` does right before building its model
    names = {"embedding.": "embed.", "decoder.": "head."}
    weights = {}
    for key, value in RNNLanguageModel(ModelConfig(**model_config)).state_dict().items():
        for ours, theirs in names.items():
            key = key.replace(ours, theirs, 1) if key.startswith(ours) else key
        weights[key] = value
    return weights


def minimal_loop(checkpoint: Path, steps: int) -> TrainSpeed:
    """The hand-written loop, on the model configuration and token stream of ``checkpoint``'s run."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from training.checkpoint import load_checkpoint
    from training.config import TrainConfig
    from training.data import batchify
    from training.run import corpus_for_checkpoint

    ckpt = load_checkpoint(checkpoint)
    m, cfg = ckpt["model_config"], TrainConfig(**ckpt["train_config"])
    ids = corpus_for_checkpoint(ckpt).train
    stream = batchify(ids, cfg.batch_size, cfg.bptt)  # [batch, length], as the textbook batchify
    rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}.get(m["cell"], nn.RNN)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(m["dropout"])
            self.embed = nn.Embedding(m["vocab_size"], m["embedding_size"])
            self.rnn = rnn_cls(
                m["embedding_size"], m["hidden_size"], m["num_layers"], batch_first=True, dropout=m["dropout"]
            )
            self.head = nn.Linear(m["hidden_size"], m["vocab_size"])
            if m["tie_weights"]:
                self.head.weight = self.embed.weight

        def forward(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
            out, state = self.rnn(self.drop(self.embed(x)), state)
            return self.head(self.drop(out)), state

    model = Model()
    # Start from the very weights `textgen train` started from (its seed, its initialisation): the two loops
    # then compute the same values, and kernels whose speed depends on the values (subnormal floats, for one)
    # cannot favour either side. Measured: PyTorch's default initialisation alone moved this loop by 7-11 %.
    model.load_state_dict(_initial_weights(m, cfg.seed))
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = None
    start = time.perf_counter()
    for i in range(steps):
        pos = (i * cfg.bptt) % (stream.size(1) - cfg.bptt - 1)
        x, y = stream[:, pos : pos + cfg.bptt], stream[:, pos + 1 : pos + 1 + cfg.bptt]
        if state is not None:
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        if cfg.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
    loss.item()  # wait for the last step
    seconds = time.perf_counter() - start
    tokens = steps * cfg.batch_size * cfg.bptt
    return TrainSpeed(tokens, seconds, tokens / seconds)


def run_train_bench(data_root: Path, out_dir: Path, presets: list[str], steps: int, threads: int) -> dict[str, Any]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"steps": steps, "threads": torch.get_num_threads(), "models": {}}
    for name in presets:
        preset = PRESETS[name]
        ours, theirs = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for attempt in range(2):
                speed, checkpoint = textgen_train(preset, data_root, steps, Path(tmp) / f"run{attempt}")
                ours.append(speed)
                theirs.append(minimal_loop(checkpoint, steps))
        best_ours = max(ours, key=lambda s: s.tokens_per_s)
        best_theirs = max(theirs, key=lambda s: s.tokens_per_s)
        row = {
            "preset": preset,
            "textgen": [asdict(s) for s in ours],
            "minimal_loop": [asdict(s) for s in theirs],
            "ratio": best_ours.tokens_per_s / best_theirs.tokens_per_s,
        }
        report["models"][name] = row
        print(
            f"{name}: textgen train {best_ours.tokens_per_s:,.0f} tokens/s, minimal loop "
            f"{best_theirs.tokens_per_s:,.0f} tokens/s, ratio {row['ratio']:.3f}",
            flush=True,
        )
    (out_dir / "train.json").write_text(json.dumps(report, indent=1, default=str))
    return report
