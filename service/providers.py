"""Which ONNX Runtime execution providers a served model's session asks for, and whether it got them.

ONNX Runtime does not fail when a provider it lists cannot start: ``onnxruntime-gpu`` lists CUDA (and TensorRT)
on a machine without a GPU, and a session asked for CUDA there logs a long "Failed to create
CUDAExecutionProvider" error and quietly runs on the CPU. So the server

- under ``providers = auto`` (the default) asks for CUDA only where a GPU is really present
  (``nvidia_gpu_present``), then for the CPU;
- given providers by name, asks for exactly those, and refuses to start when one of them is not active in the
  created session (``provider_fallback`` turns that into one warning), and refuses a name ONNX Runtime does not
  know before any session is created;
- refuses an int8 bundle on CUDA: dynamic quantization's kernels (``DynamicQuantizeLSTM``, ``MatMulInteger``) are
  CPU-only, so such a session would copy every step between host and device (auto runs it on the CPU instead).

``ProviderChoice`` is what was asked for and, once a session exists (``Bundle.execution``), what it really runs
on: the engine reads ``device``, ``device_id`` and ``cuda_graphs`` from there.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import onnxruntime as ort

from textgen.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from service.settings import ServerSettings

log = logging.getLogger("textgen.providers")

AUTO = "auto"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_GPU_PROVIDERS = (CUDA, TENSORRT)
_SETTING = "providers (TEXTGEN_PROVIDERS)"
# Precisions whose kernels run only on the CPU provider (dynamic quantization).
_CPU_ONLY_PRECISIONS = ("int8",)
_NVIDIA_DEVICE = re.compile(r"nvidia[0-9]+")

OrtProviders = list[str | tuple[str, dict[str, str]]]


@dataclass(frozen=True)
class ProviderChoice:
    """Execution providers for one session, for the engine to read.

    Before a session exists it is what will be asked for; ``Bundle.execution`` holds it as confirmed against the
    created session, where ``providers`` are the ones really active and ``device`` says where the graph runs:
    "cuda" when CUDA (or TensorRT) is active, else "cpu". ``cuda_graphs`` is true only where CUDA is: the engine must
    then run the session through IOBinding with fixed-shape buffers per batch-size bucket, every node on CUDA and
    no concurrent runs (ONNX Runtime's CUDA-graph rules)."""

    providers: tuple[str, ...]
    device: Literal["cpu", "cuda"] = "cpu"
    device_id: int = 0
    cuda_graphs: bool = False
    required: tuple[str, ...] = ()  # named explicitly: each must be active in the session
    fallback: bool = False  # a required provider that is not active is a warning, not an error
    options: dict[str, dict[str, str]] = field(default_factory=dict, compare=False, hash=False)

    @property
    def ort_providers(self) -> OrtProviders:
        """The ``providers`` argument of ``ort.InferenceSession``: names, with provider options where set."""
        return [(p, dict(self.options[p])) if p in self.options else p for p in self.providers]

    def for_precision(self, precision: str, where: Path) -> ProviderChoice:
        """This choice for a bundle of ``precision``: a CPU-only precision is refused on a GPU provider asked for
        by name (``BundleError``), and under auto runs on the CPU."""
        if precision not in _CPU_ONLY_PRECISIONS or self.device == "cpu":
            return self
        gpu = [p for p in self.providers if p in _GPU_PROVIDERS]
        if self.required:
            raise BundleError(
                f"{where}: an {precision} bundle cannot run on {', '.join(gpu)}: its dynamically quantised kernels "
                "(DynamicQuantizeLSTM, MatMulInteger) run only on the CPU. Export an fp16 bundle for the GPU "
                f"(textgen export --precision fp16), or serve this one with --providers {CPU}"
            )
        log.warning("%s: %s bundle, whose kernels are CPU-only: it runs on %s", where, precision, CPU)
        return cpu_only()

    def confirm(self, active: list[str], where: Path) -> ProviderChoice:
        """This choice as the session ``active`` (its ``get_providers()``) really runs it. A required provider
        that is not active stops the server (``ConfigError``) unless ``fallback``, which logs one warning."""
        missing = [p for p in self.required if p not in active]
        if missing:
            message = (
                f"{where}: {', '.join(missing)} was asked for but is not active in the session, which runs on "
                f"{', '.join(active)} (this ONNX Runtime build offers {', '.join(ort.get_available_providers())}; "
                "its log above says why a provider failed: no GPU, or missing CUDA/cuDNN libraries)"
            )
            if not self.fallback:
                raise ConfigError(
                    f"{_SETTING}: {message}. Use --providers auto, or --provider-fallback true to run on what is "
                    "available"
                )
            log.warning("%s; provider_fallback: serving on %s", message, ", ".join(active))
        elif not self.required and self.device == "cuda" and not any(p in active for p in _GPU_PROVIDERS):
            # auto found a GPU but CUDA did not start (e.g. an image built without the CUDA libraries)
            log.warning("%s: a GPU is present but CUDA did not start; running on %s", where, ", ".join(active))
        on_gpu = any(p in active for p in _GPU_PROVIDERS)
        return replace(
            self,
            providers=tuple(active),
            device="cuda" if on_gpu else "cpu",
            cuda_graphs=self.cuda_graphs and CUDA in active,  # a CUDA provider option
        )


def cpu_only() -> ProviderChoice:
    return ProviderChoice(providers=(CPU,))


@functools.lru_cache(maxsize=1)
def nvidia_gpu_present(dev: Path = Path("/dev")) -> bool:
    """Whether this process can use an NVIDIA GPU: a ``/dev/nvidiaN`` device node it may open.

    Those nodes are what a container runtime grants (``--gpus``, a compose GPU reservation, a Kubernetes GPU
    limit), so they answer for this process, at the cost of one directory listing. ``/proc/driver/nvidia/gpus``
    would also list the host's GPUs inside a container given none; ``nvidia-smi`` is missing from slim images and
    is a subprocess that can hang on a wedged driver; initialising the CUDA driver (``cuInit``) to decide costs
    hundreds of milliseconds. Not covered: WSL2, whose GPU is ``/dev/dxg`` (name the CUDA provider there)."""
    try:
        names = os.listdir(dev)
    except OSError:
        return False
    return any(_NVIDIA_DEVICE.fullmatch(n) and os.access(dev / n, os.R_OK | os.W_OK) for n in names)


def _check_names(names: list[str]) -> None:
    """A name ONNX Runtime does not know at all is a typo: refused before any session, with a suggestion."""
    known = ort.get_all_providers()
    by_lower = {k.lower(): k for k in known}
    for name in names:
        if name not in known:
            # case-blind, and close enough to be a slip (one wrong letter in a 20-letter name scores 0.97)
            close = difflib.get_close_matches(name.lower(), by_lower, n=1, cutoff=0.9)
            hint = f" (did you mean {by_lower[close[0]]}?)" if close else ""
            raise ConfigError(
                f"{_SETTING}: unknown execution provider {name!r}{hint}; this ONNX Runtime build offers "
                f"{', '.join(ort.get_available_providers())}, or use auto"
            )


def _cuda_options(settings: ServerSettings) -> dict[str, str]:
    options = {"device_id": str(settings.cuda_device_id)}
    if settings.cuda_memory_limit_bytes:
        options["gpu_mem_limit"] = str(settings.cuda_memory_limit_bytes)
    if settings.cuda_graphs:
        options["enable_cuda_graph"] = "1"
    return options


def choose_providers(settings: ServerSettings) -> ProviderChoice:
    """What the sessions ask for under ``settings``: auto (CUDA then CPU where ``nvidia_gpu_present``, else the
    CPU), or the named providers, each checked to be known and offered by this ONNX Runtime build."""
    wanted = list(settings.providers)
    available = ort.get_available_providers()
    if wanted == [AUTO]:
        names = [CUDA, CPU] if CUDA in available and nvidia_gpu_present() else [CPU]
        required: tuple[str, ...] = ()
    else:
        _check_names(wanted)
        absent = [p for p in wanted if p not in available]
        if absent:
            message = (
                f"{_SETTING}: {', '.join(absent)} is not in this ONNX Runtime build (it offers "
                f"{', '.join(available)}; onnxruntime-gpu, the textgen[gpu] extra, has CUDA)"
            )
            if not settings.provider_fallback:
                raise ConfigError(message)
            log.warning("%s; skipped (provider_fallback)", message)
        names = [p for p in wanted if p in available] or [CPU]
        required = tuple(names)
    options: dict[str, dict[str, str]] = {}
    if CUDA in names:
        options[CUDA] = _cuda_options(settings)
    if TENSORRT in names:
        options[TENSORRT] = {"device_id": str(settings.cuda_device_id)}
    on_gpu = any(p in names for p in _GPU_PROVIDERS)
    return ProviderChoice(
        providers=tuple(names),
        device="cuda" if on_gpu else "cpu",
        device_id=settings.cuda_device_id,
        cuda_graphs=settings.cuda_graphs and CUDA in names,
        required=required,
        fallback=settings.provider_fallback,
        options=options,
    )


def session_options(settings: ServerSettings) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.intra_op_spinning else "0")
    return opts
