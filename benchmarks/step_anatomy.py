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

  roofline       the four matmuls of benchmarks.roofline, independent, as
                 benchmarks.throughput runs them
  roofline_serial  the same four, one at a time (how the issue's reference
                 rate of "a tf.matmul of the step's first-layer shape" was
                 taken): no bound on a step, which overlaps a little
  matmul_chain   the step's five matmuls with the step's data dependencies,
                 nothing else: no element-wise work, no update, no input
  chain_update   matmul_chain plus the weight update, so that consecutive
                 steps depend on each other as in training
  compiled       naive_model.Trainer.train_epoch, a whole epoch per call,
                 XLA off and on

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

from benchmarks.report import SHARED_MNIST, machine, paired_ratio, publish, side_by_side  # noqa: E402
from benchmarks.roofline import BATCH, CLASSES, HIDDEN, roofline_loops  # noqa: E402
from naive_model.config import LayerSpec, TrainConfig  # noqa: E402
from naive_model.data import load_mnist  # noqa: E402
from naive_model.trainer import Trainer  # noqa: E402


def _chain_loops(input_size: int) -> dict:
    """tf.functions running n steps of the step's matmuls in their dependency order."""
    rng = np.random.default_rng(0)

    def constant(*shape):
        return tf.constant(rng.random(shape, dtype=np.float32) * 0.1)

    x = constant(BATCH, input_size)
    w1 = tf.Variable(constant(input_size, HIDDEN))
    w2 = tf.Variable(constant(HIDDEN, CLASSES))
    sink = tf.Variable(0.0)  # keeps every result alive without reading it per step

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

    return {"matmul_chain": chain(False), "chain_update": chain(True)}


def _trainer(dataset, jit: bool) -> Trainer:
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
    return Trainer(config, dataset)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--data", type=Path, default=None, help="MNIST .npz (default: ../shared)")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 10

    dataset = load_mnist(args.data or (SHARED_MNIST if SHARED_MNIST.exists() else None))
    steps_per_round = len(dataset.x_train) // BATCH  # one epoch's worth
    roofline = roofline_loops(dataset.input_size)
    loops = {"roofline": roofline["overlapped"], "roofline_serial": roofline["serial"]}
    loops.update(_chain_loops(dataset.input_size))

    def timer(loop):
        def samples_per_sec() -> float:
            start = time.perf_counter()
            # On a CPU a tf.function call returns when its ops have run.
            loop(tf.constant(steps_per_round))
            return steps_per_round * BATCH / (time.perf_counter() - start)

        return samples_per_sec

    with tf.device("/cpu:0"):
        timers = {}
        for name, loop in loops.items():
            loop(tf.constant(5))  # traces and warms up
            timers[name] = timer(loop)
        for jit in (False, True):
            trainer = _trainer(dataset, jit)
            trainer.train_epoch()  # traces and warms up
            timers[f"compiled_jit={jit}"] = lambda trainer=trainer: (
                trainer.train_epoch().examples_per_second
            )
        rates = side_by_side(timers, rounds)

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
