"""The recurrent state of a model's admitted sequences, resident on the session's device.

One pool per state tensor, ``[layers, slots, hidden]``, allocated once as ONNX Runtime ``OrtValue``s on the
session's device (``cpu`` here, ``cuda`` on a GPU) and bound with IOBinding as both the input and the output of
the step graph (``service.slotted_graph``), which updates the rows it runs in place. A sequence holds one slot
from admission until it finishes or pauses; a step names the slots of its rows, in any order, so nothing is
compacted or gathered when the batch changes. Host memory sees only token ids going in and logits coming out;
rows are copied out (``take``) only when a session, a snapshot or a paused stream needs them, and in (``put``)
when a sequence arrives with a state of its own."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from service.bundle import Bundle
from service.slotted_graph import SLOTS, pool_name, pool_out_name, put_model, rows_name, slotted_model, take_model

State = tuple[np.ndarray, ...]  # host copies, one array per state tensor, each [layers, batch, hidden] float32


@dataclass(frozen=True)
class StepSessions:
    """The three sessions of one model: the step graph and the two row-copy helpers."""

    step: ort.InferenceSession
    take: ort.InferenceSession
    put: ort.InferenceSession
    device: str  # "cpu" or "cuda"
    device_id: int = 0
    cuda_graphs: bool = False  # the step session captures a CUDA graph per decode batch-size bucket
    # CUDA graph ids are per session and a captured graph keeps the addresses it was captured with: every bucket
    # of every pool on this session gets a new id, never one a discarded pool's graph holds
    graph_ids: itertools.count = field(default_factory=itertools.count, compare=False)

    @property
    def host_run_options(self) -> ort.RunOptions | None:
        """Run options for a call with host feeds: outside any CUDA graph."""
        return _graph_run_options(-1) if self.cuda_graphs else None


def step_sessions(bundle: Bundle, states: list[str]) -> StepSessions:
    """Open the step graph and its helpers from a bundle loaded with ``keep_graph``, with the execution providers,
    provider options and session options of the bundle's own session (which the caller may then drop)."""
    if bundle.graph is None:
        raise ValueError("the bundle was loaded without keep_graph: its graph bytes are gone")
    model = onnx.load_from_string(bundle.graph)
    used = bundle.session.get_providers()
    options = bundle.session.get_provider_options()
    execution = bundle.execution  # device, device id and CUDA graphs as confirmed against the session

    def open_(graph: onnx.ModelProto, sess_options: ort.SessionOptions | None, step: bool) -> ort.InferenceSession:
        # the row-copy helpers run with host inputs at any shape: never under CUDA graphs
        providers = [
            (p, {k: v for k, v in options.get(p, {}).items() if step or k != "enable_cuda_graph"}) for p in used
        ]
        return ort.InferenceSession(graph.SerializeToString(), sess_options=sess_options, providers=providers)

    small = ort.SessionOptions()  # a row copy is a few KB: one thread, no thread pool to wake
    small.intra_op_num_threads = 1
    return StepSessions(
        step=open_(slotted_model(model, states), bundle.session.get_session_options(), True),
        take=open_(take_model(model, states), small, False),
        put=open_(put_model(model, states), small, False),
        device=execution.device,
        device_id=execution.device_id,
        cuda_graphs=execution.cuda_graphs,
    )


# Runs of a new CUDA graph id before it replays: ONNX Runtime runs it normally twice (its
# min_num_runs_before_cuda_graph_capture), then captures on the third and replays from then on.
_CAPTURE_RUNS = 3


def _graph_run_options(graph_id: int) -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


class _Bucket:
    """Decode-step buffers of one batch size, bound once: the inputs on the device, updated in place each step,
    and the logits bound to host memory (on a GPU ONNX Runtime copies them out itself). Under CUDA graphs the
    addresses must not change between replays; without them this saves rebinding every step."""

    def __init__(self, state: BatchState, size: int, graph_id: int | None) -> None:
        device, device_id = state.sessions.device, state.sessions.device_id
        self.size = size
        self.tokens = ort.OrtValue.ortvalue_from_shape_and_type([size, 1], np.int64, device, device_id)
        self.slots = ort.OrtValue.ortvalue_from_shape_and_type([size], np.int64, device, device_id)
        self.logits = np.empty((size, 1, state.vocab), state.dtype)
        self.io = state._bound(state.sessions.step)
        self.io.bind_ortvalue_input("tokens", self.tokens)
        self.io.bind_ortvalue_input("positions", state._position)
        self.io.bind_ortvalue_input(SLOTS, self.slots)
        self.options = _graph_run_options(graph_id) if graph_id is not None else None
        self.device_logits: ort.OrtValue | None = None
        if graph_id is None:
            # host memory: ONNX Runtime copies the logits out itself (nothing to do on the CPU)
            self.io.bind_output("logits", "cpu", 0, state.dtype, self.logits.shape, self.logits.ctypes.data)
            return
        # A replayed CUDA graph only relaunches its kernels, never the copy to a host-bound output: the logits stay
        # on the device and are copied out after each replay. ONNX Runtime runs a new graph id normally twice, then
        # captures: those runs happen here, on the scratch slot, so no sequence's row advances more than once.
        self.device_logits = ort.OrtValue.ortvalue_from_shape_and_type(
            [size, 1, state.vocab], state.dtype.type, device, device_id
        )
        self.io.bind_ortvalue_output("logits", self.device_logits)
        self.tokens.update_inplace(np.zeros((size, 1), np.int64))
        self.slots.update_inplace(np.full(size, state.scratch, np.int64))
        for _ in range(_CAPTURE_RUNS):
            state.sessions.step.run_with_iobinding(self.io, self.options)

    def read_logits(self, n: int) -> np.ndarray:
        if self.device_logits is not None:
            return self.device_logits.numpy()[:n, 0]
        return self.logits[:n, 0]


class BatchState:
    """``capacity`` slots of state on the device, and the graph calls that use them.

    A decode step runs through buffers bound once per batch size (``_Bucket``); the last size's are kept, so a
    steady batch rebinds nothing. With ``static_shapes`` (always under CUDA graphs) a decode step runs at a fixed
    batch size, the next power of two: its rows are padded with a scratch slot and token 0, and under CUDA graphs
    it replays the graph captured for that size. Prompts, whose shapes vary, never run in a captured graph."""

    def __init__(
        self,
        sessions: StepSessions,
        states: list[str],
        shape: tuple[int, int],
        dtype: type[np.generic],
        vocab: int,
        capacity: int,
        static_shapes: bool = False,
    ) -> None:
        self.sessions = sessions
        self.states = states
        self.capacity = capacity
        self.vocab = vocab
        self.dtype = np.dtype(dtype)
        self.static = static_shapes or sessions.cuda_graphs
        self.scratch = capacity  # padded rows of a static step read and write this extra slot
        layers, hidden = shape
        self.pools = {
            s: ort.OrtValue.ortvalue_from_shape_and_type(
                [layers, capacity + self.static, hidden], self.dtype.type, sessions.device, sessions.device_id
            )
            for s in states
        }
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        self._step = self._bound(sessions.step)
        self._put = self._bound(sessions.put)
        self._buckets: dict[int, _Bucket] = {}
        # a prompt's shapes vary: never captured. No run options at all otherwise: ONNX Runtime looks up an
        # unset gpu_graph_id through a C++ exception, 80 us a call
        self._dynamic = sessions.host_run_options
        zero = np.zeros(1, np.int64)
        self._position = ort.OrtValue.ortvalue_from_numpy(zero, sessions.device, sessions.device_id)

    def _bound(self, session: ort.InferenceSession) -> ort.IOBinding:
        """A binding with every pool as input and (updated in place) output."""
        io = session.io_binding()
        for s in self.states:
            io.bind_ortvalue_input(pool_name(s), self.pools[s])
            io.bind_ortvalue_output(pool_out_name(s), self.pools[s])
        return io

    # -- slots -----------------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self, state: State) -> int:
        """A free slot, holding ``state`` (host, ``[layers, 1, hidden]`` each)."""
        slot = self._free.pop()
        try:
            self.put([slot], state)
        except BaseException:
            self._free.append(slot)
            raise
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    # -- row copies ------------------------------------------------------------------------------------------
    def put(self, slots: list[int], state: State) -> None:
        io = self._put
        # referenced until the run ends: a binding points at the arrays' memory
        keep = [np.asarray(slots, np.int64), *(np.ascontiguousarray(r, dtype=self.dtype) for r in state)]
        io.bind_cpu_input(SLOTS, keep[0])
        for s, rows in zip(self.states, keep[1:], strict=True):
            io.bind_cpu_input(rows_name(s), rows)
        self.sessions.put.run_with_iobinding(io)

    def take(self, slots: list[int]) -> State:
        """Host copies (float32) of the rows in ``slots``, ``[layers, len(slots), hidden]`` each."""
        io = self.sessions.take.io_binding()
        for s in self.states:
            io.bind_ortvalue_input(pool_name(s), self.pools[s])
            io.bind_output(rows_name(s), "cpu")
        index = np.asarray(slots, np.int64)
        io.bind_cpu_input(SLOTS, index)
        self.sessions.take.run_with_iobinding(io)
        return tuple(np.asarray(v, dtype=np.float32) for v in io.copy_outputs_to_cpu())

    # -- the step --------------------------------------------------------------------------------------------
    def run(self, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Advance the rows in ``slots`` by ``tokens`` ([batch, time] int64) and return the logits at
        ``positions`` ([batch, len(positions), vocab], host memory, a fresh array the caller may keep): prompts and
        scoring."""
        io = self._step
        io.bind_cpu_input("tokens", tokens)
        io.bind_cpu_input("positions", positions)
        io.bind_cpu_input(SLOTS, slots)
        logits = np.empty((tokens.shape[0], positions.size, self.vocab), self.dtype)
        # bound to host memory: on a GPU, ONNX Runtime copies the logits out itself, and nothing else leaves
        io.bind_output("logits", "cpu", 0, self.dtype, logits.shape, logits.ctypes.data)
        self.sessions.step.run_with_iobinding(io, self._dynamic)
        return logits

    def decode(self, tokens: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """One decode step: ``tokens`` [batch] int64 into the rows in ``slots``; the logits [batch, vocab] (host
        memory, reused by the next decode step: use them before it)."""
        n = tokens.shape[0]
        size = 1 << (n - 1).bit_length() if self.static else n  # padded rows all use the scratch slot
        bucket = self._buckets.get(size)
        if bucket is None:
            if not self.static:
                self._buckets.clear()  # one size kept: a batch of any size may come, and each holds its logits
            graph_id = next(self.sessions.graph_ids) if self.sessions.cuda_graphs else None
            bucket = self._buckets[size] = _Bucket(self, size, graph_id)
        if size == n:
            bucket.tokens.update_inplace(tokens.reshape(n, 1))
            bucket.slots.update_inplace(slots)
        else:
            padded_tokens = np.zeros((size, 1), np.int64)
            padded_tokens[:n, 0] = tokens
            padded_slots = np.full(size, self.scratch, np.int64)
            padded_slots[:n] = slots
            bucket.tokens.update_inplace(padded_tokens)
            bucket.slots.update_inplace(padded_slots)
        self.sessions.step.run_with_iobinding(bucket.io, bucket.options)
        return bucket.read_logits(n)
