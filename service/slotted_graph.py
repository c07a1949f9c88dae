"""The bundle's graph rewritten to keep the recurrent state of every running sequence on the session's device, in
fixed slots of one pool per state tensor, and small helper graphs that put rows into the pool and take them out.

The exported graph takes state ``[layers, batch, hidden]`` and returns it. The slotted graph takes the pools
(``<state>_pool``, ``[layers, slots, hidden]``: the state's own layout, so no transposes) and ``slots`` (int64
``[batch]``, the slot of each batch row); it gathers the rows, runs the model unchanged, and scatters the new state
back into the pool (``<state>_pool_out``). Binding ``<state>_pool_out`` to the same ``OrtValue`` as ``<state>_pool``
updates the pool in place (ScatterND skips its copy when input and output share a buffer), so a decode step
moves only token ids in and logits out, whichever rows run and in whatever order: no state is compacted,
gathered on the host or copied back between steps.

Every graph here is built with ``onnx.helper`` from the bundle's own graph, at load time; nothing is written to
disk. Internal value names carry a prefix no exporter produces."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

_P = "textgen_slotted__"  # prefix of every value this module adds
SLOTS = "slots"


def pool_name(state: str) -> str:
    return f"{state}_pool"


def pool_out_name(state: str) -> str:
    return f"{state}_pool_out"


def rows_name(state: str) -> str:
    return f"{state}_rows"


def _elem_type(graph: onnx.GraphProto, name: str) -> int:
    for value in graph.input:
        if value.name == name:
            return value.type.tensor_type.elem_type
    raise ValueError(f"graph has no input {name!r}")


def _dims(graph: onnx.GraphProto, name: str) -> tuple[int, int]:
    """(layers, hidden) of a state input ``[layers, batch, hidden]``."""
    for value in graph.input:
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            return dims[0].dim_value, dims[2].dim_value
    raise ValueError(f"graph has no input {name!r}")


def _pool_info(name: str, elem: int, layers: int, hidden: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, [layers, "pool_slots", hidden])


def _slot_index_nodes(layers: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """``slots`` [batch] -> ScatterND indices [layers, batch, 2] of (layer, slot) pairs, by broadcasting."""
    layer = helper.make_tensor(f"{_P}layers", TensorProto.INT64, [layers, 1, 1], list(range(layers)))
    axes = helper.make_tensor(f"{_P}axes02", TensorProto.INT64, [2], [0, 2])
    zero = helper.make_tensor(f"{_P}zero", TensorProto.INT64, [], [0])
    slot, grid, index = f"{_P}slot", f"{_P}grid", f"{_P}slot_index"
    nodes = [
        helper.make_node("Unsqueeze", [SLOTS, axes.name], [slot]),  # [1, batch, 1]
        helper.make_node("Mul", [slot, zero.name], [f"{_P}slot0"]),
        helper.make_node("Add", [layer.name, f"{_P}slot0"], [grid]),  # the layer index, [layers, batch, 1]
        helper.make_node("Mul", [layer.name, zero.name], [f"{_P}layer0"]),
        helper.make_node("Add", [slot, f"{_P}layer0"], [f"{_P}slots_b"]),  # the slot, [layers, batch, 1]
        helper.make_node("Concat", [grid, f"{_P}slots_b"], [index], axis=2),
    ]
    return nodes, [layer, axes, zero], index


def _gather(state: str, out: str) -> list[onnx.NodeProto]:
    """Pool rows at ``slots`` -> ``[layers, batch, hidden]``."""
    return [helper.make_node("Gather", [pool_name(state), SLOTS], [out], axis=1)]


def _scatter(state: str, new_rows: str, index: str) -> list[onnx.NodeProto]:
    """``[layers, batch, hidden]`` -> the pool with those rows replaced at ``slots``."""
    return [helper.make_node("ScatterND", [pool_name(state), index, new_rows], [pool_out_name(state)])]


def slotted_model(model: onnx.ModelProto, states: list[str]) -> onnx.ModelProto:
    """The step graph: the bundle's graph with its state inputs/outputs replaced by pools and ``slots``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index_nodes, initializers, index = _slot_index_nodes(_dims(graph, states[0])[0])
    head: list[onnx.NodeProto] = [*index_nodes]
    tail: list[onnx.NodeProto] = []
    for state in states:
        elem, (layers, hidden) = _elem_type(graph, state), _dims(graph, state)
        graph.input.remove(next(v for v in graph.input if v.name == state))
        graph.output.remove(next(v for v in graph.output if v.name == f"{state}_out"))
        graph.input.append(_pool_info(pool_name(state), elem, layers, hidden))
        graph.output.append(_pool_info(pool_out_name(state), elem, layers, hidden))
        head += _gather(state, state)  # the model's nodes read the gathered rows under the input's old name
        tail += _scatter(state, f"{state}_out", index)
    graph.input.append(helper.make_tensor_value_info(SLOTS, TensorProto.INT64, ["batch"]))
    graph.initializer.extend(initializers)
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _helper_model(model: onnx.ModelProto, name: str, nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=model.ir_version)


def take_model(model: onnx.ModelProto, states: list[str]) -> onnx.ModelProto:
    """Copy rows out of the pools: (pools, ``slots``) -> ``<state>_rows`` ``[layers, batch, hidden]``."""
    g = model.graph
    nodes, inputs, outputs = [], [], []
    for state in states:
        elem, (layers, hidden) = _elem_type(g, state), _dims(g, state)
        inputs.append(_pool_info(pool_name(state), elem, layers, hidden))
        outputs.append(helper.make_tensor_value_info(rows_name(state), elem, [layers, "batch", hidden]))
        nodes += _gather(state, rows_name(state))
    inputs.append(helper.make_tensor_value_info(SLOTS, TensorProto.INT64, ["batch"]))
    return _helper_model(model, "textgen_take_rows", nodes, inputs, outputs)


def put_model(model: onnx.ModelProto, states: list[str]) -> onnx.ModelProto:
    """Write rows into the pools: (pools, ``slots``, ``<state>_rows``) -> ``<state>_pool_out`` (bound in place)."""
    g = model.graph
    index_nodes, initializers, index = _slot_index_nodes(_dims(g, states[0])[0])
    nodes, inputs, outputs = [*index_nodes], [], []
    for state in states:
        elem, (layers, hidden) = _elem_type(g, state), _dims(g, state)
        inputs.append(_pool_info(pool_name(state), elem, layers, hidden))
        inputs.append(helper.make_tensor_value_info(rows_name(state), elem, [layers, "batch", hidden]))
        outputs.append(_pool_info(pool_out_name(state), elem, layers, hidden))
        nodes += _scatter(state, rows_name(state), index)
    inputs.append(helper.make_tensor_value_info(SLOTS, TensorProto.INT64, ["batch"]))
    return _helper_model(model, "textgen_put_rows", nodes, inputs, outputs, initializers)
