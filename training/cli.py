"""``textgen train``, ``textgen eval`` and ``textgen sample``: flags and handlers. Torch is imported inside
the handlers only, so building the parser stays light."""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from textgen.flags import add_control_flags, add_sampling_flags, local_sampling_params
from training.config import OPTIMIZERS, SCHEDULES, TrainConfig
from training.corpus import DataConfig

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")  # the model's CELLS, without importing torch here
DEFAULT_RUN_DIR = "runs/default"


# Training flags, one row each: flag, TrainConfig field, help (the default is appended), argparse options.
_TRAIN_FLAGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--batch-size", "batch_size", "parallel streams per step", {"type": int, "metavar": "N"}),
    ("--bptt", "bptt", "truncated-BPTT window in tokens", {"type": int, "metavar": "N"}),
    (
        "--max-steps",
        "max_steps",
        "optimizer steps in the run (also the cosine schedule's length)",
        {"type": int, "metavar": "N"},
    ),
    ("--optimizer", "optimizer", "optimizer", {"choices": OPTIMIZERS}),
    ("--lr", "lr", "peak learning rate", {"type": float}),
    ("--weight-decay", "weight_decay", "decoupled weight decay (AdamW) or L2 (SGD)", {"type": float}),
    ("--momentum", "momentum", "SGD momentum", {"type": float}),
    ("--clip", "clip", "gradient-norm clipping threshold, 0 to disable", {"type": float}),
    (
        "--schedule",
        "schedule",
        "learning-rate schedule: cosine (with warm-up), plateau (decay when validation stalls), "
        "step (decay per epoch after --decay-after epochs) or constant",
        {"choices": SCHEDULES},
    ),
    ("--warmup-steps", "warmup_steps", "linear warm-up steps (cosine)", {"type": int}),
    ("--min-lr-ratio", "min_lr_ratio", "cosine floor as a fraction of --lr", {"type": float}),
    ("--plateau-factor", "plateau_factor", "plateau: multiply the lr by this", {"type": float}),
    (
        "--plateau-patience",
        "plateau_patience",
        "plateau: evaluations without improvement before a decay",
        {"type": int},
    ),
    ("--decay-after", "decay_after", "step: epochs at the full lr before decaying", {"type": int, "metavar": "N"}),
    ("--decay-factor", "decay_factor", "step: multiply the lr by this each later epoch", {"type": float}),
    ("--eval-every", "eval_every", "evaluate and checkpoint every N steps", {"type": int, "metavar": "N"}),
    ("--eval-batch-size", "eval_batch_size", "streams used for evaluation", {"type": int, "metavar": "N"}),
    (
        "--patience",
        "patience",
        "stop early after N evaluations without improvement (0: never)",
        {"type": int, "metavar": "N"},
    ),
    ("--log-every", "log_every", "write training metrics every N steps", {"type": int, "metavar": "N"}),
    ("--seed", "seed", "random seed (initialisation, dropout)", {"type": int}),
    ("--device", "device", "auto (CUDA when present), cpu, cuda or cuda:N", {}),
    ("--bf16", "bf16", "bf16 autocast on CUDA (default: off)", {"action": "store_const", "const": True}),
]


def _default(cls: type, name: str) -> Any:
    field = next(f for f in fields(cls) if f.name == name)
    return None if field.default is MISSING else field.default


def _split_arg(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions, got {text!r}")
    return parts  # type: ignore[return-value]


def _flag(group: Any, flag: str, section: str, name: str, help: str, cls: type | None = None, **kw: Any) -> None:
    """A flag stored as ``section__name``; absent flags stay absent, so a resume can tell what was given."""
    if cls is not None and "default: " not in help:
        help = f"{help} (default: {_default(cls, name)})"
    if "action" not in kw and "choices" not in kw:
        kw.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    group.add_argument(flag, dest=f"{section}__{name}", default=argparse.SUPPRESS, help=help, **kw)


def _section(args: argparse.Namespace, section: str) -> dict[str, Any]:
    prefix = f"{section}__"
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}


def register(commands: Any) -> None:
    _register_train(commands)
    _register_eval(commands)
    _register_sample(commands)


def _register_train(commands: Any) -> None:
    p = commands.add_parser(
        "train",
        help="train a char- or word-level recurrent language model",
        description="Train a language model with truncated BPTT. Checkpoints go to RUN_DIR/best.pt (best "
        "validation loss) and RUN_DIR/last.pt (latest); metrics to RUN_DIR/metrics.jsonl. Ctrl-C saves "
        "last.pt at the next step boundary; --resume continues exactly where it stopped. Under torchrun "
        "(torchrun --standalone --nproc-per-node N -m textgen.cli train ...) it trains data-parallel, one "
        "process per rank (per GPU on CUDA), --batch-size being the global batch.",
    )
    d = p.add_argument_group("data")
    _flag(
        d,
        "--data",
        "data",
        "path",
        "a text file (split by position), a directory of text files, or a "
        "directory holding train/valid/test files (ptb.train.txt ... or train.txt ...) (default: the "
        "Python standard library's source)",
        metavar="PATH",
    )
    _flag(
        d,
        "--valid-data",
        "data",
        "valid_path",
        "explicit validation file (with --test-data; --data is then the training file) (default: none)",
        metavar="FILE",
    )
    _flag(d, "--test-data", "data", "test_path", "explicit test file (default: none)", metavar="FILE")
    _flag(d, "--level", "data", "level", "tokenization level", DataConfig, choices=("char", "word"))
    _flag(
        d,
        "--split",
        "data",
        "split",
        "train,valid,test fractions of a single corpus, cut by position (default: 0.9,0.05,0.05)",
        type=_split_arg,
        metavar="F,F,F",
    )
    _flag(d, "--glob", "data", "glob", "file pattern inside a --data directory", DataConfig)
    _flag(
        d,
        "--max-chars",
        "data",
        "max_chars",
        "read at most this many characters of the corpus (default: 4,000,000 for the standard library, else no cap)",
        type=int,
        metavar="N",
    )
    _flag(
        d,
        "--vocab-size",
        "data",
        "vocab_size",
        "keep only the N most frequent tokens, <unk> included (default: no cap)",
        type=int,
        metavar="N",
    )
    _flag(
        d,
        "--min-freq",
        "data",
        "min_freq",
        "drop tokens seen fewer than N times in the training split",
        DataConfig,
        type=int,
        metavar="N",
    )

    m = p.add_argument_group("model")
    _flag(m, "--cell", "model", "cell", "recurrent cell type (default: lstm)", choices=CELLS)
    _flag(
        m, "--layers", "model", "num_layers", "number of stacked recurrent layers (default: 2)", type=int, metavar="N"
    )
    _flag(m, "--hidden", "model", "hidden_size", "hidden units per layer (default: 256)", type=int, metavar="N")
    _flag(
        m,
        "--embedding",
        "model",
        "embedding_size",
        "embedding size (default: 64 for char, the hidden size for word or with --tie-weights)",
        type=int,
        metavar="N",
    )
    _flag(
        m,
        "--dropout",
        "model",
        "dropout",
        "dropout on the embedding, between layers and before the decoder (default: 0.0)",
        type=float,
        metavar="P",
    )
    _flag(
        m,
        "--tie-weights",
        "model",
        "tie_weights",
        "share the embedding matrix with the decoder (default: off)",
        action="store_const",
        const=True,
    )

    t = p.add_argument_group("training")
    for flag, name, help_text, kw in _TRAIN_FLAGS:
        _flag(t, flag, "train", name, help_text, TrainConfig, **kw)
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        metavar="N",
        help="train for N passes over the training split (sets --max-steps)",
    )

    r = p.add_argument_group("run")
    r.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_RUN_DIR),
        metavar="RUN_DIR",
        help=f"run directory for checkpoints and metrics (default: {DEFAULT_RUN_DIR})",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in RUN_DIR from last.pt; model and data flags must match it",
    )
    r.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="pause after STEP (saving last.pt) without shortening the schedule",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_train)


def _register_eval(commands: Any) -> None:
    p = commands.add_parser(
        "eval",
        help="loss and bpc/perplexity of a checkpoint on a data split",
        description="Evaluate a checkpoint on its own data's split, or on other data.",
    )
    p.add_argument("checkpoint", type=Path, help="a .pt checkpoint (e.g. runs/default/best.pt)")
    p.add_argument("--split", default="test", choices=("train", "valid", "test"), help="split (default: test)")
    _flag(
        p,
        "--data",
        "data",
        "path",
        "evaluate on this file or directory instead of the checkpoint's data, "
        "split the same way (default: the checkpoint's data)",
        metavar="PATH",
    )
    p.add_argument("--batch-size", type=int, default=10, help="evaluation streams (default: 10)")
    p.add_argument("--bptt", type=int, default=256, help="tokens per forward call (default: 256)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(handler=_eval)


def _register_sample(commands: Any) -> None:
    p = commands.add_parser(
        "sample",
        help="generate text from a checkpoint with PyTorch (the reference sampler)",
        description="Generate with PyTorch on the CPU. The sampling rule is shared with "
        "the service, so the same seed gives the same text there.",
    )
    p.add_argument("checkpoint", type=Path, help="a .pt checkpoint (e.g. runs/default/best.pt)")
    add_sampling_flags(p, max_tokens=200)
    add_control_flags(p, top_logprobs=False)
    p.set_defaults(handler=_sample)


def _train(args: argparse.Namespace) -> int:
    from training.run import run_train

    result = run_train(
        _section(args, "model"),
        _section(args, "data"),
        _section(args, "train"),
        args.out,
        resume=args.resume,
        epochs=args.epochs,
        stop_at=args.stop_at,
        progress=not args.quiet,
    )
    if result.rank != 0:  # under torchrun, rank 0 speaks for the run
        return 130 if result.stop_reason == "interrupted" else 0
    quality = f"; last validation {result.last_quality.summary()}" if result.last_quality else ""
    print(
        f"{result.stop_reason} at step {result.step} (epoch {result.epoch}) after {result.wall_s:.1f} s; "
        f"training {result.train_tokens_per_s:,.0f} tokens/s; best validation loss {result.best_val_loss:.4f}"
        f"{quality}"
    )
    print(f"checkpoints in {result.out_dir}/ (best.pt, last.pt)")
    if result.stop_reason in ("paused", "interrupted"):
        launcher = "textgen"
        if result.world_size > 1:
            launcher = f"torchrun --standalone --nproc-per-node {result.world_size} -m textgen.cli"
        print(f"continue with: {launcher} train --out {result.out_dir} --resume")
    return 130 if result.stop_reason == "interrupted" else 0


def _eval(args: argparse.Namespace) -> int:
    from training.checkpoint import load_checkpoint, model_from_checkpoint
    from training.evaluate import evaluate
    from training.run import corpus_for_checkpoint
    from training.trainer import resolve_device

    checkpoint = load_checkpoint(args.checkpoint)
    model, tokenizer = model_from_checkpoint(checkpoint)
    corpus = corpus_for_checkpoint(checkpoint, _section(args, "data"))
    device = resolve_device(args.device)
    quality = evaluate(model.to(device), corpus.split(args.split), tokenizer.level, args.batch_size, args.bptt, device)
    print(f"{args.split}: {quality.summary()}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from textgen.errors import InvalidInputError
    from textgen.sampling import random_seed
    from training.checkpoint import load_checkpoint, model_from_checkpoint
    from training.generate import generate_text

    seed = args.seed
    if seed is None:
        seed = random_seed()
        print(f"seed: {seed}", file=sys.stderr)
    model, tokenizer = model_from_checkpoint(load_checkpoint(args.checkpoint))
    params = local_sampling_params(args, tokenizer)
    stop_ids = frozenset(args.stop_token)
    for token in sorted(stop_ids):  # (the sampler checks the other ids against the vocabulary itself)
        if not 0 <= token < tokenizer.vocab_size:
            vocab = tokenizer.vocab_size
            raise InvalidInputError(f"--stop-token {token}: not in the model's vocabulary ({vocab} tokens)")
    out = sys.stdout
    out.write(args.prompt)
    for piece in generate_text(model, tokenizer, args.prompt, args.max_tokens, params, seed, stop_ids):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0
