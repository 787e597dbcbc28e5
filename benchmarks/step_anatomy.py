"""Where the compiled step stands against the matmul roofline, and why.

    python -m benchmarks.step_anatomy --json FILE [--quick] [--data PATH]

`benchmarks.throughput` compares the compiled loop with a roofline made of the
step's matmuls timed on their own. Those matmuls are independent of one
another, so TensorFlow runs them overlapped; a training step cannot: each of
its matmuls waits for the one before (x@W1 -> h@W2 -> the gradients ->
x^T@g1 -> the update that the next step's x@W1 reads). This benchmark times,
in interleaved rounds (each round runs every entry once, so a change in the
machine's speed falls on all of them; the fastest round counts), per-step
work of growing completeness:

  roofline       the four matmuls of benchmarks.throughput, independent
  roofline_serial  the same four, one at a time (how the issue's reference
                 rate of "a tf.matmul of the step's first-layer shape" was
                 taken): no bound on a step, which overlaps a little
  matmul_chain   the step's five matmuls with the step's data dependencies,
                 nothing else: no element-wise work, no update, no input
  chain_update   matmul_chain plus the weight update, so that consecutive
                 steps depend on each other as in training
  compiled       naive_model.Trainer, a whole epoch per call, XLA off and on

`chain_update/roofline` bounds what any step with SGD's data dependencies
can reach on this machine with these kernels, whatever its element-wise work
costs. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.report import machine, paired_ratio, publish, side_by_side  # noqa: E402
from naive_model.config import LayerSpec, TrainConfig  # noqa: E402
from naive_model.data import load_mnist  # noqa: E402
from naive_model.trainer import Trainer  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist.npz"
BATCH, HIDDEN, CLASSES = 128, 512, 10


def _step_loops(input_size: int) -> dict:
    """tf.functions running n steps of each matmul-only entry."""
    rng = np.random.default_rng(0)

    def constant(*shape):
        return tf.constant(rng.random(shape, dtype=np.float32) * 0.1)

    x, g1 = constant(BATCH, input_size), constant(BATCH, HIDDEN)
    h, g2 = constant(BATCH, HIDDEN), constant(BATCH, CLASSES)
    w1 = tf.Variable(constant(input_size, HIDDEN))
    w2 = tf.Variable(constant(HIDDEN, CLASSES))
    sink = tf.Variable(0.0)  # keeps every result alive without reading it per step

    @tf.function
    def roofline(n):
        for _ in tf.range(n):
            sink.assign_add(
                tf.matmul(x, w1)[0, 0]
                + tf.matmul(h, w2)[0, 0]
                + tf.matmul(x, g1, transpose_a=True)[0, 0]
                + tf.matmul(h, g2, transpose_a=True)[0, 0]
            )

    @tf.function
    def roofline_serial(n):
        for _ in tf.range(n):
            # One matmul at a time: no two iterations, and no two matmuls, overlap.
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            forward_1 = tf.matmul(x, w1)[0, 0]
            with tf.control_dependencies([forward_1]):
                forward_2 = tf.matmul(h, w2)[0, 0]
            with tf.control_dependencies([forward_2]):
                gradient_1 = tf.matmul(x, g1, transpose_a=True)[0, 0]
            with tf.control_dependencies([gradient_1]):
                gradient_2 = tf.matmul(h, g2, transpose_a=True)[0, 0]
            sink.assign_add(forward_1 + forward_2 + gradient_1 + gradient_2)

    def chain(update: bool):
        @tf.function
        def steps(n):
            for _ in tf.range(n):
                hidden = tf.matmul(x, w1)  # (batch, hidden)
                logits = tf.matmul(hidden, w2)  # (batch, classes)
                grad_w2 = tf.matmul(hidden, logits, transpose_a=True)  # (hidden, classes)
                grad_hidden = tf.matmul(logits, w2, transpose_b=True)  # (batch, hidden)
                grad_w1 = tf.matmul(x, grad_hidden, transpose_a=True)  # (input, hidden)
                if update:
                    # A tiny rate keeps the values finite over many steps.
                    w1.assign_sub(grad_w1 * 1e-9)
                    w2.assign_sub(grad_w2 * 1e-9)
                else:
                    sink.assign_add(grad_w1[0, 0] + grad_w2[0, 0])

        return steps

    return {
        "roofline": roofline,
        "roofline_serial": roofline_serial,
        "matmul_chain": chain(False),
        "chain_update": chain(True),
    }


def _trainer_loop(dataset, jit: bool):
    config = TrainConfig(
        layers=(
            LayerSpec(units=HIDDEN, activation="relu"),
            LayerSpec(units=CLASSES, activation="softmax"),
        ),
        initializer="glorot",
        optimizer="sgd",
        learning_rate=1e-3,
        batch_size=BATCH,
        jit_compile=jit,
    )
    trainer = Trainer(config, dataset)

    def steps(n):
        trainer._train_loop(tf.constant(0, tf.int64), tf.cast(n, tf.int64))

    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--data", type=Path, default=None, help="MNIST .npz (default: ../shared)")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 10

    dataset = load_mnist(args.data or (DEFAULT_DATA if DEFAULT_DATA.exists() else None))
    steps_per_round = len(dataset.x_train) // BATCH  # one epoch's worth
    loops = _step_loops(dataset.input_size)
    for jit in (False, True):
        loops[f"compiled_jit={jit}"] = _trainer_loop(dataset, jit)

    def timer(loop):
        def samples_per_sec() -> float:
            start = time.perf_counter()
            # On a CPU a tf.function call returns when its ops have run.
            loop(tf.constant(steps_per_round))
            return steps_per_round * BATCH / (time.perf_counter() - start)

        return samples_per_sec

    with tf.device("/cpu:0"):
        for loop in loops.values():
            loop(tf.constant(5))  # traces and warms up
        rates = side_by_side({name: timer(loop) for name, loop in loops.items()}, rounds)

    # Other work on the machine only slows a round down: the fastest round counts.
    fastest = {name: max(values) for name, values in rates.items()}
    compiled = max(("compiled_jit=False", "compiled_jit=True"), key=fastest.get)
    rates["compiled"] = rates[compiled]
    fastest["compiled"] = fastest[compiled]
    for name in ("compiled_jit=False", "compiled_jit=True"):
        fastest.pop(name)
    report = {
        "samples_per_sec": fastest,
        "samples_per_sec_rounds": rates,
        "compiled": compiled,
        "ratios_to_roofline": {
            name: rate / fastest["roofline"] for name, rate in fastest.items() if name != "roofline"
        },
        "ratios_to_roofline_paired_median": {
            name: paired_ratio(rates[name], rates["roofline"])
            for name in fastest
            if name != "roofline"
        },
        "setup": {"batch_size": BATCH, "model": f"784-{HIDDEN}-{CLASSES}", "rounds": rounds},
        "machine": machine(),
    }
    publish(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
