"""Data-parallel training under ``torchrun`` (PyTorch DDP): one process per rank, gloo on the CPU, NCCL on GPUs.

Layout: the global batch of ``batch_size`` streams is laid out exactly as a one-process run lays it out
(``data.batchify``), and rank r trains rows ``[r*b, (r+1)*b)``, ``b = batch_size / world_size``. Consecutive rows
are consecutive stretches of the token stream, so each rank reads one contiguous shard; every shard has the same
length, so every rank runs the same windows and steps (collectives hang otherwise); and the gradient DDP averages
over the ranks (each the mean over its ``b x T`` tokens) is the mean over the same ``B x T`` tokens a one-process
step uses: the same global batch, up to the order of floating-point sums.

Everything else is kept identical on every rank or agreed on: evaluation is split by rows and its loss summed over
the ranks, a stop request (SIGINT/SIGTERM) ends every rank at the same step, checkpoints hold the whole batch's
carried state and every rank's RNG state, and rank 0 alone writes them while the others wait.

``Replicas.single`` is a one-process run: there every method returns its input, so that path is unchanged."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from textgen.errors import ConfigError
from training.model import RNNLanguageModel, State

# What torchrun sets for each worker; ``init_process_group``'s default env:// rendezvous reads the last two.
_LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Launch | None:
        """The launch torchrun describes in ``environ``, or None outside torchrun (a one-process run)."""
        present = [name for name in _LAUNCH_VARIABLES if name in environ]
        if not present:
            return None
        missing = [name for name in _LAUNCH_VARIABLES if name not in environ]
        if missing:
            raise ConfigError(
                f"incomplete torchrun environment: {', '.join(present)} set but not {', '.join(missing)}; "
                "start distributed training with torchrun, or unset these variables"
            )
        try:
            rank, local_rank, world = (int(environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        except ValueError:
            raise ConfigError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (torchrun sets them)") from None
        if world < 1 or not 0 <= rank < world or local_rank < 0:
            raise ConfigError(
                f"inconsistent torchrun environment: RANK {rank}, LOCAL_RANK {local_rank}, WORLD_SIZE {world}"
            )
        return cls(rank, local_rank, world)


def check_layout(batch_size: int, world_size: int) -> None:
    """The global batch must split into equal whole shards, or ranks would train different amounts of data."""
    if batch_size % world_size:
        raise ConfigError(
            f"--batch-size {batch_size} cannot be split evenly over {world_size} processes: it is the global batch, "
            f"and each process trains an equal share of its streams (at least one); use a multiple of {world_size}"
        )


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's dropout stream: distinct per rank, reproducible from the run's seed."""
    return seed + rank


class Replicas:
    """One training process's view of the others (``launch`` None: a one-process run, nothing to share).

    Collectives other than DDP's own gradient all-reduce run on CPU tensors in ``control``, a gloo group (the
    default group when training on the CPU): loss sums, stop flags, gathered states and barriers stay off the GPU."""

    def __init__(self, device: torch.device, launch: Launch | None = None, control: Any = None) -> None:
        self.device = device
        self.launch = launch
        self._control = control

    @classmethod
    def single(cls, device: torch.device) -> Replicas:
        return cls(device)

    @property
    def distributed(self) -> bool:
        return self.launch is not None

    @property
    def rank(self) -> int:
        return self.launch.rank if self.launch else 0

    @property
    def world_size(self) -> int:
        return self.launch.world_size if self.launch else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, tensor: Tensor, dim: int) -> Tensor:
        """This rank's equal share of ``tensor``'s batch dimension ``dim`` (rows of a stream: 0; of a state: 1)."""
        if not self.distributed:
            return tensor
        size = tensor.size(dim) // self.world_size
        return tensor.narrow(dim, self.rank * size, size)

    def eval_rows(self, stream: Tensor) -> Tensor:
        """This rank's rows of an evaluation stream: near-equal shares, possibly none (losses are summed after)."""
        if not self.distributed:
            return stream
        return torch.tensor_split(stream, self.world_size)[self.rank]

    def wrap(self, model: RNNLanguageModel) -> nn.Module:
        """The module to train: DDP around ``model`` (already on this rank's device), or ``model`` itself."""
        if not self.distributed:
            return model
        model.rnn.flatten_parameters()  # cuDNN wants one flat weight buffer once on the device (pytorch #37079)
        # An LM uses every parameter every step: no unused-parameter search (it costs a graph walk per step).
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (the values themselves in a one-process run)."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total, group=self._control)
        return total.tolist()

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        return self.sum(value)[0] / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a signal reaches ranks at different steps)."""
        if not self.distributed:
            return flag
        return self.sum(float(flag))[0] > 0

    def gather_state(self, state: State) -> list[Tensor]:
        """The carried state of the whole global batch, on the CPU, rows in rank order (what ``shard`` undoes)."""
        local = [s.detach().cpu() for s in state]
        if not self.distributed:
            return local
        whole = []
        for part in local:
            parts = [torch.empty_like(part) for _ in range(self.world_size)]
            dist.all_gather(parts, part.contiguous(), group=self._control)
            whole.append(torch.cat(parts, dim=1))
        return whole

    def rng_states(self) -> dict[str, Any]:
        """RNG states for a checkpoint: this (or rank 0's) at the top level, as a one-process run saves them,
        and every rank's under ``ranks``."""
        own = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }
        if not self.distributed:
            return own
        ranks: list[Any] = [None] * self.world_size
        dist.all_gather_object(ranks, own, group=self._control)
        return {**ranks[0], "ranks": ranks}

    def seed(self, seed: int) -> None:
        """Seed this rank's dropout stream (after the model is built: initialisation is the same on every rank)."""
        if self.distributed:
            torch.manual_seed(rank_seed(seed, self.rank))

    def restore_rng(self, saved: dict[str, Any], saved_world_size: int, seed: int) -> bool:
        """Continue each rank's random stream from a checkpoint written by as many processes; from another world
        size, no rank's stream continues, and each starts from its seed as in a new run. Returns whether the
        streams continue."""
        if saved_world_size != self.world_size:
            torch.manual_seed(rank_seed(seed, self.rank))
            return False
        # a one-process run saves no "ranks" (its states are the top level ones, as are rank 0's under torchrun)
        own = saved.get("ranks", [saved])[self.rank]
        torch.set_rng_state(own["torch"])
        if self.device.type == "cuda" and own.get("cuda"):
            torch.cuda.set_rng_state_all(own["cuda"])
        return True

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._control)


def _rank_device(launch: Launch, name: str) -> torch.device:
    """One process per GPU: rank ``LOCAL_RANK`` of a node trains on ``cuda:LOCAL_RANK``."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ConfigError(
            f"--device {name} under torchrun: each process trains on the GPU of its local rank; "
            "pass --device cuda (or auto), or cpu"
        )
    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but CUDA is not available")
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise ConfigError(
            f"local rank {launch.local_rank} has no GPU of its own: this machine has {count}; "
            f"start at most {count} processes per node (--nproc-per-node {count})"
        )
    return torch.device("cuda", launch.local_rank)


@contextlib.contextmanager
def started(launch: Launch, device_name: str) -> Iterator[Replicas]:
    """Join the process group torchrun set up (gloo on the CPU, NCCL on GPUs) for the length of a run."""
    device = _rank_device(launch, device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the model is built, so nothing lands on cuda:0 by default
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size)
    try:
        control = dist.new_group(backend="gloo") if backend == "nccl" else None
        yield Replicas(device, launch, control)
    finally:
        dist.destroy_process_group()
