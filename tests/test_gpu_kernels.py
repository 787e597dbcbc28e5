"""Every op of the compiled step has a GPU kernel that keeps the data on the GPU.

No GPU runs here, so this reads TensorFlow's kernel registry instead: the ops
come from the traced graph of the training loop (its while body included), and
each must have a kernel registered for GPU (or for every device, DEFAULT) for
the dtypes it uses. A GPU kernel may still keep a tensor in host memory (the
int32 kernels of Equal, ResourceGather and friends do); so the tensors that
carry the data set (from the per-step gathers onward: images, labels, scores,
predictions, hits, losses, gradients) are followed through the graph, and no
kernel they reach may hold them in host memory. Labels in int32 would fail
here, as they did before they became int64.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import kernel_def_pb2, node_def_pb2
from tensorflow.python.framework import kernels, op_def_registry

from naive_model.config import PRECISIONS, LayerSpec, StrategyConfig, TrainConfig
from naive_model.data import from_arrays
from naive_model.distribute import make_strategy
from naive_model.trainer import Trainer

SMALL = (LayerSpec(units=32, activation="relu"), LayerSpec(units=10, activation="softmax"))
# Ops whose output describes a tensor's shape, not its values: data stops there.
SHAPE_OPS = {"Shape", "ShapeN", "Size", "Rank", "BroadcastGradientArgs"}
# Nodes that are not kernels: a function's arguments.
NOT_KERNELS = {"Placeholder"}
# float16 only: Keras's LossScaleOptimizer applies or skips the update in a
# tf.cond on "all gradients finite", whose predicate TensorFlow reads on the
# host (Switch/If keep `pred` in host memory): one bool per step. bfloat16
# needs no loss scale and has no such branch.
LOSS_SCALE_BRANCH = {("If", "cond"), ("StatelessIf", "cond"), ("Switch", "pred")}


def _uint8_dataset():
    rng = np.random.default_rng(0)
    return from_arrays(
        "pixels",
        rng.integers(0, 256, (256, 8, 8), dtype=np.uint8),
        rng.integers(0, 10, 256),
        rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
        rng.integers(0, 10, 64),
    )


def step_graph(trainer: Trainer) -> list[tuple[str, node_def_pb2.NodeDef]]:
    """(function, node) for every node of the traced training loop and the functions it calls."""
    return graph_nodes(trainer._train_loop.get_concrete_function())


def graph_nodes(concrete_function) -> list[tuple[str, node_def_pb2.NodeDef]]:
    graph_def = concrete_function.graph.as_graph_def()
    nodes = [("", node) for node in graph_def.node]
    for function in graph_def.library.function:
        nodes += [(function.signature.name, node) for node in function.node_def]
    return nodes


def type_attrs(node: node_def_pb2.NodeDef) -> dict[str, tuple[str, ...]]:
    """The node's type attributes, e.g. {"T": ("float32",), "Tindices": ("int64",)}."""
    found = {}
    for name, value in node.attr.items():
        kind = value.WhichOneof("value")
        if kind == "type":
            found[name] = (tf.dtypes.as_dtype(value.type).name,)
        elif kind == "list" and value.list.type:
            found[name] = tuple(tf.dtypes.as_dtype(t).name for t in value.list.type)
    return found


def gpu_kernel(node: node_def_pb2.NodeDef) -> kernel_def_pb2.KernelDef | None:
    """The kernel TensorFlow would pick for the node on a GPU: GPU first, then DEFAULT."""
    attrs = type_attrs(node)
    registered = kernels.get_registered_kernels_for_op(node.op).kernel
    for device in ("GPU", "DEFAULT"):
        for kernel in registered:
            if kernel.device_type != device:
                continue
            if all(
                constraint.name in attrs
                and set(attrs[constraint.name])
                <= {tf.dtypes.as_dtype(t).name for t in constraint.allowed_values.list.type}
                for constraint in kernel.constraint
            ):
                return kernel
    return None


def _input_arg_names(node: node_def_pb2.NodeDef) -> list[str]:
    """The OpDef argument each of the node's data inputs feeds, in order."""
    op_def = op_def_registry.get(node.op)
    names = []
    for arg in op_def.input_arg:
        if arg.number_attr:
            count = node.attr[arg.number_attr].i
        elif arg.type_list_attr:
            count = len(node.attr[arg.type_list_attr].list.type)
        else:
            count = 1
        names += [arg.name] * count
    return names


def data_in_host_memory(
    nodes: list[tuple[str, node_def_pb2.NodeDef]],
) -> list[tuple[str, str, str]]:
    """(node, op, argument) wherever a kernel holds a tensor of the data set in host memory.

    The data set's tensors start at the step's gathers (ResourceGather) and
    run through every node fed by one, up to ops that only read a shape.
    """
    by_function: dict[str, list[node_def_pb2.NodeDef]] = defaultdict(list)
    for function, node in nodes:
        by_function[function].append(node)
    found = []
    for function_nodes in by_function.values():
        tainted: set[str] = set()
        changed = True
        while changed:  # nodes come in any order: propagate to a fixed point
            changed = False
            for node in function_nodes:
                if node.name in tainted or node.op in SHAPE_OPS:
                    continue
                feeds = [name.split(":")[0] for name in node.input if not name.startswith("^")]
                if node.op == "ResourceGather" or any(feed in tainted for feed in feeds):
                    tainted.add(node.name)
                    changed = True
        for node in function_nodes:
            if node.name not in tainted:
                continue
            kernel = gpu_kernel(node)
            if kernel is None:
                continue  # reported by the kernel check
            host = set(kernel.host_memory_arg) - {"resource"}
            arg_names = _input_arg_names(node)
            data_inputs = [name for name in node.input if not name.startswith("^")]
            for position, name in enumerate(data_inputs):
                if name.split(":")[0] in tainted and arg_names[position] in host:
                    found.append((node.name, node.op, arg_names[position]))
            outputs = {arg.name for arg in op_def_registry.get(node.op).output_arg}
            found += [(node.name, node.op, arg) for arg in sorted(outputs & host)]
    return found


def kernel_table(nodes: list[tuple[str, node_def_pb2.NodeDef]]) -> list[tuple[str, str, str, str]]:
    """(op, dtypes, GPU kernel found, arguments in host memory), one row per op and dtypes."""
    rows = {}
    for _, node in nodes:
        if node.op in NOT_KERNELS:
            continue
        dtypes = " ".join(
            f"{name}={','.join(sorted(set(types)))}"  # a list attr: its distinct dtypes
            for name, types in sorted(type_attrs(node).items())
        )
        kernel = gpu_kernel(node)
        found = "no" if kernel is None else f"yes ({kernel.device_type})"
        host = "" if kernel is None else ",".join(sorted(set(kernel.host_memory_arg)))
        rows[(node.op, dtypes)] = (node.op, dtypes, found, host)
    return sorted(rows.values())


def _print_table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    header = ("op", "dtypes", "GPU kernel", "host-memory args")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    print(f"\n{title}")
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


@pytest.fixture(scope="module")
def dataset():
    return _uint8_dataset()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_op_of_the_step_has_a_gpu_kernel_keeping_data_on_the_gpu(dataset, precision):
    trainer = Trainer(
        TrainConfig(layers=SMALL, batch_size=64, optimizer="adam", precision=precision),
        dataset,
        make_strategy(StrategyConfig(kind="cpu")),
    )
    nodes = step_graph(trainer)
    rows = kernel_table(nodes)
    _print_table(f"the training step's ops, {precision}, on a GPU:", rows)

    assert {"ResourceGather", "SparseSoftmaxCrossEntropyWithLogits", "ArgMax", "Equal"} <= {
        row[0] for row in rows
    }
    assert [row for row in rows if row[2] == "no"] == []
    on_host = data_in_host_memory(nodes)
    if precision == "float16":
        on_host = [hit for hit in on_host if (hit[1], hit[2]) not in LOSS_SCALE_BRANCH]
    assert on_host == []


def test_the_check_catches_int32_labels():
    """The check is not vacuous: the step's label path as it was, in int32, fails it."""
    labels = tf.Variable(np.zeros(64, np.int32))

    @tf.function
    def hits(indices, scores):
        gathered = tf.gather(labels, indices)  # (batch,)
        predicted = tf.argmax(scores, axis=1, output_type=tf.int32)  # (batch,)
        return tf.reduce_sum(tf.cast(predicted == gathered, tf.int64))

    nodes = graph_nodes(
        hits.get_concrete_function(tf.TensorSpec((8,), tf.int64), tf.TensorSpec((8, 10)))
    )
    rows = kernel_table(nodes)
    _print_table("the label path in int32, as it was, on a GPU:", rows)
    assert ("ResourceGather", "Tindices=int64 dtype=int32", "no", "") in rows
    on_host = {(op, arg) for _, op, arg in data_in_host_memory(nodes)}
    assert {("Equal", "y"), ("Equal", "z")} <= on_host  # the labels in, the hits out
