"""The served models: bundles found from the settings, each opened in one ONNX Runtime session with the
configured execution providers, and the graph call the engine makes (tokens + state in, logits + state out)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.batch_state import BatchState, State, step_sessions
from service.bundle import Bundle, load_bundle
from service.manifest import MANIFEST, is_version_dir_name
from service.providers import choose_providers, session_options
from service.settings import ServerSettings
from service.slotted_graph import SLOTS, pool_name, pool_out_name
from textgen.errors import BundleError, InvalidInputError, NotFoundError

log = logging.getLogger("textgen.models")


@dataclass
class ServedModel:
    """One bundle ready to run: its step sessions (``service.slotted_graph``), its tokenizer and what the engine
    needs to know of its graph. The bundle's own session is replaced by the step graph's: the weights are held
    once."""

    bundle: Bundle
    unknown_policy: str  # "map" or "reject"
    tokenizer_sha256: str = ""
    state_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        m = self.bundle.manifest
        self.state_names = list(m.graph.state)
        self.tokenizer_sha256 = m.files[m.tokenizer.file]
        spec = {t.name: t.dtype for t in m.graph.inputs}
        self.state_dtype = np.dtype(spec[self.state_names[0]])  # float32, or float16 for an fp16 bundle
        self.sessions = step_sessions(self.bundle, self.state_names)
        self._exported: ort.InferenceSession | None = self.bundle.session  # until warm_up has checked against it
        self.bundle = replace(self.bundle, session=self.sessions.step, graph=None)
        self._outputs = ["logits", *(pool_out_name(s) for s in self.state_names)]

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    @property
    def tokenizer(self):
        return self.bundle.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.bundle.manifest.model.vocab_size

    @property
    def state_shape(self) -> tuple[int, int]:
        m = self.bundle.manifest.model
        return m.num_layers, m.hidden_size

    @property
    def state_bytes(self) -> int:
        """Bytes of one sequence's recurrent state as the server keeps it on the host (float32): fixed per model,
        whatever the history length."""
        layers, hidden = self.state_shape
        return len(self.state_names) * layers * hidden * 4

    def zero_state(self, batch: int = 1) -> State:
        layers, hidden = self.state_shape
        return tuple(np.zeros((layers, batch, hidden), np.float32) for _ in self.state_names)

    def batch_state(self, capacity: int, static_shapes: bool = False) -> BatchState:
        """Device-resident state for ``capacity`` sequences (the engine's decode batch); ``static_shapes`` pads
        decode steps to power-of-two buckets, as CUDA graphs need (implied by them)."""
        return BatchState(
            self.sessions,
            self.state_names,
            self.state_shape,
            self.state_dtype.type,
            self.vocab_size,
            capacity,
            static_shapes,
        )

    def run(self, tokens: np.ndarray, positions: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """One graph call from host arrays, outside the engine (warm-up, tools): ``tokens`` [batch, time] from
        ``state``; logits [batch, len(positions), vocab] at the given time positions, and the state after the
        last token (float32). The step graph runs with a pool of exactly this batch."""
        batch = tokens.shape[0]
        feeds = {"tokens": tokens, "positions": positions, SLOTS: np.arange(batch, dtype=np.int64)}
        for name, s in zip(self.state_names, state, strict=True):
            feeds[pool_name(name)] = np.ascontiguousarray(s, dtype=self.state_dtype)
        logits, *pools = self.sessions.step.run(self._outputs, feeds, self.sessions.host_run_options)
        return logits, tuple(p.astype(np.float32, copy=False) for p in pools)

    def warm_up(self) -> None:
        """Run a prompt-shaped and a step-shaped call once, so the first request does not pay for ONNX Runtime's
        first-run allocations (about 15 ms on CPU), and check the device-resident path against the bundle's own
        graph: a prompt and a decode step on one slot give its logits and state, and leave another slot as it was.
        Then the bundle's own session is dropped (the step graph holds the same weights)."""
        exported, self._exported = self._exported, None
        start = np.full((1, 2), self.tokenizer.start_id, np.int64)
        self.run(start, np.array([1]), self.zero_state(1))
        if exported is None:
            return
        names = ["logits", *(f"{s}_out" for s in self.state_names)]
        state = [s.astype(self.state_dtype) for s in self.zero_state(1)]
        feeds = {"tokens": start, "positions": np.array([1]), **dict(zip(self.state_names, state, strict=True))}
        want_prompt, *state = exported.run(names, feeds)
        feeds = {"tokens": start[:, :1], "positions": np.array([0]), **dict(zip(self.state_names, state, strict=True))}
        want_step, *state = exported.run(names, feeds)
        tol = 1e-5 if self.state_dtype == np.float32 else 1e-2  # the same arithmetic; slack for kernel choice
        pool = self.batch_state(2)
        other = tuple(np.full_like(s, 0.5) for s in self.zero_state(1))
        pool.put([0], other)
        pool.put([1], self.zero_state(1))
        prompt = pool.run(start, np.array([1]), np.array([1]))
        step = pool.decode(start[0, :1], np.array([1]))
        if not (
            np.allclose(prompt, want_prompt, rtol=0, atol=tol)
            and np.allclose(step, want_step[:, 0], rtol=0, atol=tol)
            and all(np.allclose(a, b, rtol=0, atol=tol) for a, b in zip(pool.take([1]), state, strict=True))
            and all(np.array_equal(a, b) for a, b in zip(pool.take([0]), other, strict=True))
        ):
            raise BundleError(
                f"model {self.name}: the device-resident step graph disagrees with the bundle's own graph on "
                f"{', '.join(self.bundle.providers)}"
            )

    def check_length(self, text: str, field_name: str, max_tokens: int) -> None:
        """Refuse a text that surely holds more than ``max_tokens`` tokens, in O(1) or one C-speed scan, before
        any encoding (on the event loop): a character model's tokens are its characters, and every line end is
        one ``<eos>`` token of a word model."""
        if self.tokenizer.level.value == "char":
            if len(text) > max_tokens:
                raise InvalidInputError(
                    f"{field_name}: {len(text)} characters exceed this server's maximum of {max_tokens} tokens "
                    "(one per character for this model)"
                )
        elif len(text) > max_tokens and text.count("\n") > max_tokens:
            raise InvalidInputError(
                f"{field_name}: more than {max_tokens} lines, each a token: over this server's maximum of "
                f"{max_tokens} tokens"
            )

    def encode_prompt(self, text: str, field_name: str, max_tokens: int) -> np.ndarray:
        """Token ids of a prompt, at most ``max_tokens`` of them, applying the model's unknown-token policy.
        ``check_length`` first; encoding stops at the first piece past the limit, so its cost is bounded by the
        limit, not the text. Milliseconds for a long text: call it off the event loop."""
        level = self.tokenizer.level.value
        self.check_length(text, field_name, max_tokens)
        parts = self.tokenizer.encode_parts(text, max_tokens)
        count = sum(p.size for p in parts)
        if count > max_tokens:
            # encoding stopped at the piece that crossed the limit: the count so far is a lower bound
            raise InvalidInputError(
                f"{field_name}: {count} tokens or more exceed this server's maximum of {max_tokens}"
            )
        if self.unknown_policy == "reject":
            unknown = self.tokenizer.first_unknown(text, parts)
            if unknown is not None:
                offset, piece = unknown
                what = "character" if level == "char" else "word"
                shown = f"{piece!r} (U+{ord(piece):04X})" if len(piece) == 1 else repr(piece)
                raise InvalidInputError(
                    f"{field_name}: {what} {shown} at offset {offset} is not in the vocabulary of model {self.name}"
                )
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _open(path: Path, settings: ServerSettings) -> ServedModel:
    # providers: chosen (auto, or the named ones checked), then confirmed active by the loader (service.providers)
    bundle = load_bundle(
        path, providers=choose_providers(settings), session_options=session_options(settings), keep_graph=True
    )
    used = bundle.providers
    policy = settings.unknown_tokens
    if policy == "auto":
        policy = "reject" if bundle.manifest.tokenizer.level == "char" else "map"
    model = ServedModel(bundle, policy)
    try:
        model.warm_up()
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidArgument, ...) for a bad run
        raise BundleError(f"{path}: the warm-up run failed: {str(exc).splitlines()[0]}") from None
    log.info(
        "loaded model %s version %s from %s: %s %dx%d, vocab %d, %s, providers %s",
        model.name,
        model.version,
        path,
        bundle.manifest.model.cell,
        *model.state_shape,
        model.vocab_size,
        bundle.manifest.graph.precision,
        ", ".join(used),
    )
    return model


def find_bundles(repo: Path) -> dict[str, list[Path]]:
    """Each model directory of the repository with its version directories, newest first. Only names the
    repository rule accepts count (``is_version_dir_name``: 1, 2, ...); anything else, such as an unfinished
    export's '.'-prefixed staging directory, is never a candidate, whatever it holds."""
    if not repo.is_dir():
        raise BundleError(f"model repository not found: {repo}")
    found: dict[str, list[Path]] = {}
    try:
        model_dirs = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise BundleError(f"model repository {repo}: cannot list it ({exc.strerror})") from None
    for model_dir in model_dirs:
        try:
            entries = list(model_dir.iterdir())
        except OSError as exc:
            log.error("skipping model directory %s: cannot list it (%s)", model_dir, exc.strerror)
            continue
        versions = []
        for entry in entries:
            if is_version_dir_name(entry.name):
                versions.append(entry)
            else:
                log.warning(
                    "ignoring %s: not a version directory (versions are named 1, 2, ...; a '.'-prefixed "
                    "directory is an unfinished export's, safe to delete when no export is running)",
                    entry,
                )
        if versions:
            found[model_dir.name] = sorted(versions, key=lambda v: int(v.name), reverse=True)
    if not found:
        raise BundleError(f"model repository {repo} holds no <model>/<version>/{MANIFEST} bundle")
    return found


@dataclass(frozen=True)
class SkippedBundle:
    """A bundle the server did not serve, and why (its ``BundleError`` message)."""

    path: Path
    reason: str


def _open_in_repository(path: Path, model_dir: str, settings: ServerSettings) -> ServedModel:
    model = _open(path, settings)
    if model.name != model_dir:
        # The exporter names a bundle after its model directory; two directories claiming one name would be
        # two different models served under one name.
        raise BundleError(f"{path}: its manifest names model {model.name!r}, but it lies in {model_dir}/")
    return model


def _newest_loadable(
    model_dir: str, versions: list[Path], settings: ServerSettings, skipped: list[SkippedBundle]
) -> ServedModel | None:
    """The newest version of one model that loads; each one that does not is logged and recorded."""
    for path in versions:
        try:
            model = _open_in_repository(path, model_dir, settings)
        except BundleError as exc:
            skipped.append(SkippedBundle(path, str(exc)))
            log.error("skipping bundle %s: %s", path, exc)
            continue
        if path is not versions[0]:
            log.warning("model %s: serving version %s, the newest that loads", model_dir, path.name)
        return model
    log.error("model %s skipped: none of its %d version(s) loads", model_dir, len(versions))
    return None


class ModelRegistry:
    """The models this server serves, by name, and the bundles it skipped at start-up."""

    def __init__(self, models: list[ServedModel], skipped: list[SkippedBundle] | None = None) -> None:
        self._models: dict[str, ServedModel] = {}
        self.skipped: list[SkippedBundle] = list(skipped or [])
        for m in models:
            if m.name in self._models:
                raise BundleError(
                    f"two bundles are named {m.name!r}: {self._models[m.name].bundle.path}, {m.bundle.path}"
                )
            self._models[m.name] = m

    @classmethod
    def load(cls, settings: ServerSettings) -> ModelRegistry:
        """One explicit ``bundle``: it must load. A ``model_repository``: the newest loadable version of each
        model; a bad bundle is skipped (error logged) for the next older version, and start-up fails only when
        no model at all loads."""
        if settings.bundle is not None:
            return cls([_open(settings.bundle, settings)])
        repo = settings.model_repository
        assert repo is not None
        models: list[ServedModel] = []
        skipped: list[SkippedBundle] = []
        for model_dir, versions in find_bundles(repo).items():
            model = _newest_loadable(model_dir, versions, settings, skipped)
            if model is not None:
                models.append(model)
        if not models:
            reasons = "; ".join(s.reason for s in skipped)
            raise BundleError(f"model repository {repo}: no model could be loaded ({reasons})")
        return cls(models, skipped)

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str) -> ServedModel:
        """The named model; an empty name means the only one served."""
        if not name:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise InvalidInputError(
                f"model: required, this server serves {len(self._models)} models ({', '.join(sorted(self._models))})"
            )
        try:
            return self._models[name]
        except KeyError:
            raise NotFoundError(
                f"model {name!r} is not served here (served: {', '.join(sorted(self._models))})"
            ) from None
