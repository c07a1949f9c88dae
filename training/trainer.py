"""The training loop: truncated BPTT with the state carried across windows, clipping, AdamW/SGD, a cosine,
plateau or per-epoch step schedule, periodic evaluation, early stopping, best/last checkpoints and an exact
``--resume``."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from textgen.errors import ConfigError
from training.checkpoint import save_checkpoint
from training.config import TrainConfig
from training.corpus import DataConfig
from training.data import TokenizedCorpus, batchify, window, windows_per_epoch
from training.distributed import Replicas
from training.evaluate import Quality, evaluate
from training.model import ModelConfig, RNNLanguageModel, State, detach_state

BEST = "best.pt"
LAST = "last.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    step: int
    epoch: int
    stop_reason: str  # max_steps, early_stop, paused (--stop-at), interrupted (SIGINT/SIGTERM)
    best_val_loss: float
    last_quality: Quality | None
    train_tokens_per_s: float
    wall_s: float
    out_dir: Path
    model: RNNLanguageModel  # the last step's weights, on the training device
    rank: int = 0  # this process's rank under torchrun (0 alone writes checkpoints and metrics)
    world_size: int = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: cfg.decay_factor ** max(0, step // steps_per_epoch - cfg.decay_after + 1)
        )

    def cosine(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, cosine)


def _apply_changed_hyperparameters(
    opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig, saved: TrainConfig
) -> None:
    """On resume, the restored optimizer and scheduler state carry the saved lr, weight decay and momentum; the
    ones given again replace them (same optimizer and scheduler kind: ``run._check_resumable``). Nothing is
    touched when nothing changed, so a plain resume stays bit-exact."""
    for group in opt.param_groups:
        if cfg.weight_decay != saved.weight_decay:
            group["weight_decay"] = cfg.weight_decay
        if cfg.optimizer == "sgd" and cfg.momentum != saved.momentum:
            group["momentum"] = cfg.momentum
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):  # its saved state holds these too
        sched.factor, sched.patience = cfg.plateau_factor, cfg.plateau_patience
    if cfg.lr == saved.lr:
        return
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        for group in opt.param_groups:  # keep the reductions made so far, from the new peak
            group["lr"] *= cfg.lr / saved.lr
        return
    sched.base_lrs = [cfg.lr] * len(opt.param_groups)
    for group, factor in zip(opt.param_groups, sched.lr_lambdas, strict=True):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor(sched.last_epoch)


@contextlib.contextmanager
def _stop_requests() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (and save), not mid-update.
    A second Ctrl-C falls through to the default handler."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum: int, frame: object) -> None:
        if event.is_set():
            signal.default_int_handler(signum, frame)
        event.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    data_cfg: DataConfig,
    corpus: TokenizedCorpus,
    out_dir: Path,
    resume: dict[str, Any] | None = None,
    stop_at: int | None = None,
    progress: bool = True,
    replicas: Replicas | None = None,
) -> TrainResult:
    """Train (or, given a checkpoint dict in ``resume``, continue) and write checkpoints into ``out_dir``.

    ``stop_at`` pauses after that step without changing the schedule: a run paused and resumed ends with the
    same weights as one run straight through. ``replicas``: this process's place in a data-parallel run
    (``training.distributed``); None for one process."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    replicas = replicas or Replicas.single(resolve_device(cfg.device))
    device = replicas.device
    if cfg.bf16 and device.type != "cuda":
        raise ConfigError("bf16 autocast needs a CUDA device")
    started = time.perf_counter()

    torch.manual_seed(cfg.seed)
    model = RNNLanguageModel(model_cfg).to(device)
    replicas.seed(cfg.seed)
    opt = _make_optimizer(model, cfg)
    # This rank's rows of the global batch (all of it in one process): same length, so same windows, on each rank.
    stream = replicas.shard(batchify(corpus.train, cfg.batch_size, cfg.bptt), 0).to(device)
    rows = stream.size(0)
    n_windows = windows_per_epoch(stream, cfg.bptt)
    sched = _make_scheduler(opt, cfg, n_windows)
    step, epoch, position = 0, 0, 0
    state: State = model.init_state(rows)
    best_val, since_best = math.inf, 0
    last_quality: Quality | None = None

    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        _apply_changed_hyperparameters(opt, sched, cfg, TrainConfig(**resume["train_config"]))
        step, epoch, position = resume["step"], resume["epoch"], resume["data_position"]
        state = tuple(replicas.shard(s, 1).to(device) for s in resume["carried_state"])
        best_val, since_best = resume["best_val_loss"], resume["evals_since_best"]
        saved_world = resume.get("world_size", 1)
        if not replicas.restore_rng(resume["rng"], saved_world, cfg.seed) and replicas.is_main:
            print(
                f"note: {out_dir} was saved by {saved_world} process(es) and resumes on {replicas.world_size}: "
                "data, schedule and state continue; dropout masks come from new random streams",
                file=sys.stderr,
            )

    def payload() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "model_config": model_cfg.to_dict(),
            "tokenizer": {"level": corpus.tokenizer.level.value, "json": corpus.tokenizer.to_json()},
            "train_config": cfg.to_dict(),
            "data_config": {**data_cfg.__dict__, "split": list(data_cfg.split)},
            "data_description": corpus.description,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "epoch": epoch,
            "data_position": position,
            "carried_state": replicas.gather_state(state),  # the whole global batch's
            "rng": replicas.rng_states(),
            "world_size": replicas.world_size,
            "best_val_loss": best_val,
            "evals_since_best": since_best,
            "metrics": last_quality.as_dict("val_") if last_quality else {},
            "saved_at": time.time(),
        }

    log_path = out_dir / METRICS

    def save(name: str) -> None:
        record = payload()  # on every rank: it gathers the carried and RNG states
        if replicas.is_main:
            save_checkpoint(out_dir / name, record)
        replicas.barrier()  # no rank moves on, or exits, before the checkpoint is on disk

    def log(record: dict[str, Any]) -> None:
        if replicas.is_main:
            _append_jsonl(log_path, record)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not progress or not replicas.is_main,
        unit="step",
        dynamic_ncols=True,
        desc="train",
    )
    running_loss = torch.zeros((), device=device)
    # Steps summed into running_loss: counted, because after a resume the first interval is partial.
    running_steps = 0
    window_tokens, total_tokens, train_time = 0, 0, 0.0
    # tokens/s counts training only: evaluation and checkpoint time inside an interval is subtracted.
    interval_start, interval_pause = time.perf_counter(), 0.0
    saved_step = -1
    stop_reason = "max_steps"
    net = replicas.wrap(model)
    model.train()
    with _stop_requests() as stop_requested:
        while step < cfg.max_steps:
            if stop_at is not None and step >= stop_at:
                stop_reason = "paused"
                break
            if replicas.any(stop_requested.is_set()):  # every rank stops at the same step
                stop_reason = "interrupted"
                break
            if position == 0:  # a new pass over the data starts from a zero state
                state = model.init_state(rows)
            x, y = window(stream, position, cfg.bptt)
            state = detach_state(state)
            with autocast():
                logits, state = net(x, state)
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            if not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step()
            step += 1
            position += cfg.bptt
            if position >= n_windows * cfg.bptt:
                position, epoch = 0, epoch + 1
            running_loss += loss.detach()
            running_steps += 1
            window_tokens += y.numel() * replicas.world_size
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                train_loss = replicas.mean(running_loss.item()) / running_steps  # .item() syncs CUDA
                now = time.perf_counter()
                elapsed = now - interval_start - interval_pause
                tps = window_tokens / elapsed
                lr = opt.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
                log(
                    {
                        "step": step,
                        "epoch": epoch,
                        "train_loss": train_loss,
                        "tokens_per_s": tps,
                        "lr": lr,
                        "time": time.time(),
                    },
                )
                total_tokens, train_time = total_tokens + window_tokens, train_time + elapsed
                running_loss.zero_()
                running_steps, window_tokens, interval_start, interval_pause = 0, 0, now, 0.0

            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                eval_start = time.perf_counter()
                last_quality = evaluate(
                    model, corpus.valid, corpus.tokenizer.level, cfg.eval_batch_size, cfg.bptt, device, replicas
                )
                model.train()
                improved = last_quality.loss < best_val
                if improved:
                    best_val, since_best = last_quality.loss, 0
                else:
                    since_best += 1
                if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    sched.step(last_quality.loss)
                log(
                    {
                        "step": step,
                        "epoch": epoch,
                        **last_quality.as_dict("val_"),
                        "best_val_loss": best_val,
                        "time": time.time(),
                    },
                )
                if replicas.is_main:
                    bar.write(f"step {step}: validation {last_quality.summary()}" + (" (best)" if improved else ""))
                if improved:
                    save(BEST)
                save(LAST)
                saved_step = step
                interval_pause += time.perf_counter() - eval_start
                if cfg.patience and since_best >= cfg.patience:
                    stop_reason = "early_stop"
                    break
    bar.close()
    if window_tokens:
        total_tokens += window_tokens
        train_time += time.perf_counter() - interval_start - interval_pause
    if saved_step != step:
        save(LAST)
    log({"step": step, "event": stop_reason, "best_val_loss": best_val, "time": time.time()})
    return TrainResult(
        step=step,
        epoch=epoch,
        stop_reason=stop_reason,
        best_val_loss=best_val,
        last_quality=last_quality,
        train_tokens_per_s=total_tokens / train_time if train_time > 0 else 0.0,
        wall_s=time.perf_counter() - started,
        out_dir=out_dir,
        model=model,
        rank=replicas.rank,
        world_size=replicas.world_size,
    )
