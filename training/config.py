"""Training hyper-parameters (model and data configs live beside the model and corpus code)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from textgen.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "plateau", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    bptt: int = 128  # truncated-BPTT window, in tokens
    max_steps: int = 2000  # length of the run (and of the cosine schedule)
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.0
    momentum: float = 0.0  # SGD only
    clip: float = 1.0  # gradient-norm clipping; 0 disables it
    schedule: str = "cosine"
    warmup_steps: int = 50  # linear warm-up before the cosine decay
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    plateau_factor: float = 0.5  # plateau: lr multiplier when validation loss stops improving
    plateau_patience: int = 0  # plateau: evaluations without improvement before decaying
    # step: full lr for decay_after epochs, then times decay_factor per epoch (Zaremba et al.: 4 and 0.5;
    # char-rnn's learning_rate_decay_after / learning_rate_decay default to 10 and 0.97)
    decay_after: int = 10
    decay_factor: float = 0.97
    eval_every: int = 200
    eval_batch_size: int = 10
    patience: int = 0  # early stopping after this many evaluations without improvement; 0 disables it
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto: CUDA when present, else CPU
    bf16: bool = False  # bf16 autocast (CUDA only)

    def __post_init__(self) -> None:
        positive = ("batch_size", "bptt", "max_steps", "eval_every", "eval_batch_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive (got {self.lr})")
        for name in ("weight_decay", "momentum", "clip", "warmup_steps", "patience", "plateau_patience", "decay_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.plateau_factor < 1 or not 0 < self.decay_factor <= 1:
            raise ConfigError("min_lr_ratio must be in [0, 1], plateau_factor in (0, 1) and decay_factor in (0, 1]")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"unknown device {self.device!r}: choose auto, cpu or cuda[:N]")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
