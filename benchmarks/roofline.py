"""The roofline's matmuls: the four of one step of the book's model, at the step's shapes.

Forward x@W1 (batch x input x 512) and h@W2 (batch x 512 x 10), and the
weight gradients x^T@g1 and h^T@g2 of the same sizes. The input gradient of
the first layer is not needed, so it is neither run nor counted. Shared by
benchmarks.throughput (the bound its ratios divide by) and
benchmarks.step_anatomy (which sets it beside a step's dependent matmuls).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

BATCH, HIDDEN, CLASSES = 128, 512, 10


def flops_per_sample(input_size: int) -> float:
    """Multiply-adds (two flops each) of the four matmuls, per example."""
    per_step = 2 * (2 * BATCH * input_size * HIDDEN) + 2 * (2 * BATCH * HIDDEN * CLASSES)
    return per_step / BATCH


def roofline_loops(input_size: int) -> dict[str, tf.types.experimental.PolymorphicFunction]:
    """tf.functions running the four matmuls n times, returning a sum of their results.

    `overlapped`: the matmuls are independent, so TensorFlow runs them (and
    consecutive iterations) side by side: the roofline. `serial`: one matmul
    at a time, no two overlapping.
    """
    rng = np.random.default_rng(0)

    def tensor(*shape):
        return tf.constant(rng.random(shape, dtype=np.float32))

    x, w1, g1 = tensor(BATCH, input_size), tensor(input_size, HIDDEN), tensor(BATCH, HIDDEN)
    h, w2, g2 = tensor(BATCH, HIDDEN), tensor(HIDDEN, CLASSES), tensor(BATCH, CLASSES)

    # Each result is summed (one row of it) so that no matmul is pruned from the graph.
    def forward_1():
        return tf.reduce_sum(tf.matmul(x, w1)[0])

    def forward_2():
        return tf.reduce_sum(tf.matmul(h, w2)[0])

    def gradient_1():
        return tf.reduce_sum(tf.matmul(x, g1, transpose_a=True)[0])

    def gradient_2():
        return tf.reduce_sum(tf.matmul(h, g2, transpose_a=True)[0])

    @tf.function
    def overlapped(steps):
        total = tf.constant(0.0)
        for _ in tf.range(steps):
            total += forward_1() + forward_2()
            total += gradient_1()
            total += gradient_2()
        return total

    @tf.function
    def serial(steps):
        total = tf.constant(0.0)
        for _ in tf.range(steps):
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            results = []
            for matmul in (forward_1, forward_2, gradient_1, gradient_2):
                with tf.control_dependencies(results[-1:]):
                    results.append(matmul())
            total += tf.add_n(results)
        return total

    return {"overlapped": overlapped, "serial": serial}
