"""The hand-built layers against Keras, and the book's own checks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from naive_model.config import LayerSpec
from naive_model.layers import NaiveDense, NaiveSequential, build_model


def test_naive_dense_equals_keras_dense_given_the_same_weights():
    rng = np.random.default_rng(0)
    x = rng.random((16, 20), dtype=np.float32)
    for activation in ("relu", "softmax", "sigmoid", "tanh", "linear"):
        naive = NaiveDense(20, 7, activation, initializer="glorot", seed=3)
        dense = keras.layers.Dense(7, activation=activation)
        dense.build((None, 20))
        dense.set_weights([w.numpy() for w in naive.weights])
        np.testing.assert_allclose(naive(x).numpy(), dense(x).numpy(), rtol=1e-6, atol=1e-6)


def test_the_books_model_has_exactly_four_weights():
    model = NaiveSequential([NaiveDense(28 * 28, 512, "relu"), NaiveDense(512, 10, "softmax")])
    assert len(model.weights) == 4
    assert [tuple(w.shape) for w in model.weights] == [(784, 512), (512,), (512, 10), (10,)]
    assert all(isinstance(w, tf.Variable) for w in model.weights)
    assert isinstance(model, tf.Module)


def test_seed_initialiser_is_the_books_uniform_and_reproducible():
    layer = NaiveDense(784, 512, initializer="seed", seed=1)
    w = layer.W.numpy()
    assert 0.0 <= w.min() and w.max() < 0.1
    assert abs(w.mean() - 0.05) < 0.001
    assert not layer.b.numpy().any()
    again = NaiveDense(784, 512, initializer="seed", seed=1)
    np.testing.assert_array_equal(w, again.W.numpy())


def test_glorot_initialiser_bounds():
    w = NaiveDense(784, 512, initializer="glorot", seed=0).W.numpy()
    limit = (6 / (784 + 512)) ** 0.5
    assert -limit <= w.min() and w.max() <= limit
    assert abs(w.mean()) < 0.01


def test_build_model_takes_any_sizes_and_activations():
    model = build_model(
        30,
        [
            LayerSpec(units=64, activation="tanh"),
            LayerSpec(units=16, activation="sigmoid"),
            LayerSpec(units=3, activation="softmax"),
        ],
        initializer="glorot",
        seed=5,
    )
    assert [tuple(w.shape) for w in model.weights] == [
        (30, 64),
        (64,),
        (64, 16),
        (16,),
        (16, 3),
        (3,),
    ]
    probabilities = model(np.ones((4, 30), np.float32)).numpy()  # (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_unknown_activation_is_refused_by_name():
    with pytest.raises(ValueError, match="activation.*'swish'"):
        NaiveDense(3, 2, "swish")
