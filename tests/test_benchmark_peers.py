"""The peers' own checks: each computes naive_model's step, and trains the same epochs.

Collected only where JAX (the `bench` extra) or PyTorch's CPU build is
installed: CI has neither, by design (tests/conftest.py leaves this file out
there; tests/test_benchmarks.py checks that a missing peer is reported).
"""

from __future__ import annotations

import numpy as np
import pytest

from naive_model.data import synthetic_dataset

pytestmark = pytest.mark.slow

PEER_PACKAGES = {
    "jax_scan": "jax",
    "jax_step": "jax",
    "torch_eager": "torch",
    "torch_compile": "torch",
}

# -- the peers, where their packages are installed (CI has neither) ---------

LEARNING_RATE = 0.1  # large enough that one step moves every weight visibly


@pytest.fixture(scope="module")
def reference_step():
    """One SGD step of naive_model's model and loss on a fixed batch, in TensorFlow.

    Returns the batch, the initial weights [W1, b1, W2, b2] ((in, out) layout),
    and what the step gives: the new weights, the loss sum and the hits.
    """
    import tensorflow as tf

    from naive_model.config import LayerSpec
    from naive_model.layers import build_model
    from naive_model.losses import per_example_loss

    data = synthetic_dataset(num_train=128, num_test=8)
    layers = (LayerSpec(units=32, activation="relu"), LayerSpec(units=10, activation="softmax"))
    model = build_model(data.input_size, layers, initializer="glorot")
    for weight in model.weights[1::2]:  # non-zero biases, so that their use is checked too
        weight.assign(tf.random.stateless_uniform(weight.shape, seed=(1, 2), minval=-0.1))
    initial = [weight.numpy() for weight in model.weights]
    images, labels = tf.constant(data.x_train), tf.constant(data.y_train)
    with tf.GradientTape() as tape:
        losses, scores = per_example_loss(model, images, labels)  # (batch,)
        loss = tf.reduce_sum(losses) / len(data.x_train)
    gradients = tape.gradient(loss, model.weights)
    updated = [w - LEARNING_RATE * g for w, g in zip(initial, gradients, strict=True)]
    predicted = tf.argmax(scores, axis=1, output_type=tf.int32)  # (batch,)
    hits = int(tf.reduce_sum(tf.cast(predicted == labels, tf.int32)))
    return data, initial, updated, float(tf.reduce_sum(losses)), hits


def test_jax_step_computes_naive_models_step(reference_step):
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from benchmarks.peers_jax import train_step

    data, initial, updated, loss_sum, hits = reference_step
    params = [(jnp.asarray(initial[0]), jnp.asarray(initial[1]))]
    params.append((jnp.asarray(initial[2]), jnp.asarray(initial[3])))

    params, step_loss, step_hits = train_step(
        params, jnp.asarray(data.x_train), jnp.asarray(data.y_train), LEARNING_RATE
    )

    got = [np.asarray(weight) for layer in params for weight in layer]
    for weight, expected in zip(got, updated, strict=True):
        np.testing.assert_allclose(weight, expected, rtol=1e-4, atol=1e-6)
    assert float(step_loss) == pytest.approx(loss_sum, rel=1e-5)
    assert int(step_hits) == hits


def test_torch_step_computes_naive_models_step(reference_step):
    pytest.importorskip("torch")
    import torch

    from benchmarks.peers_torch import TorchMLP

    data, initial, updated, loss_sum, hits = reference_step
    runner = TorchMLP(data, hidden=32, batch_size=128, learning_rate=LEARNING_RATE, compile=False)
    with torch.no_grad():
        for parameter, weight in zip(runner.model.parameters(), initial, strict=True):
            parameter.copy_(torch.from_numpy(weight.T.copy()))  # nn.Linear holds (out, in)
    step_loss, step_hits = torch.zeros(()), torch.zeros((), dtype=torch.int64)

    runner.train_step(torch.arange(128), step_loss, step_hits)

    got = [parameter.detach().numpy().T for parameter in runner.model.parameters()]
    for weight, expected in zip(got, updated, strict=True):
        np.testing.assert_allclose(weight, expected, rtol=1e-4, atol=1e-6)
    assert float(step_loss) == pytest.approx(loss_sum, rel=1e-5)
    assert int(step_hits) == hits


@pytest.mark.parametrize("package", ["jax", "torch"])
def test_peers_train_epochs_of_the_same_work_each_way(package):
    """Both ways of one framework draw the same weights and orders: the same epochs."""
    pytest.importorskip(package)
    module = __import__(f"benchmarks.peers_{package}", fromlist=["peers"])
    data = synthetic_dataset(num_train=1300, num_test=8)  # 10 batches, 20 examples dropped

    runners = module.peers(data, hidden=32, batch_size=128, learning_rate=1e-2)

    assert set(runners) == {peer for peer, owner in PEER_PACKAGES.items() if owner == package}
    epochs = {name: [runner.train_epoch() for _ in range(2)] for name, runner in runners.items()}
    first, second = epochs.values()
    for a, b in zip(first, second, strict=True):
        assert (a.epoch, a.steps, a.examples) == (b.epoch, b.steps, b.examples)
        assert (a.steps, a.examples) == (10, 1280)
        assert a.loss == pytest.approx(b.loss, rel=1e-4)
        assert a.accuracy == pytest.approx(b.accuracy, abs=1 / 1280)
    assert first[1].loss < first[0].loss
