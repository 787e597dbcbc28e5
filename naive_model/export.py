"""SavedModel export, and using an export without this project's model code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from naive_model.layers import NaiveDense, NaiveSequential
from naive_model.losses import probabilities
from naive_model.results import Metrics

SIGNATURE = "serving_default"


class _ServingModule(tf.Module):
    """The model and one signature: float32 inputs -> class probabilities."""

    def __init__(self, model: NaiveSequential, input_size: int):
        super().__init__(name="ntrain_model")
        self.model = model
        self.serve = tf.function(
            lambda inputs: {"probabilities": probabilities(self.model, inputs)},
            input_signature=[tf.TensorSpec((None, input_size), tf.float32, name="inputs")],
        )


def _plain_copy(model: NaiveSequential) -> NaiveSequential:
    """The same layers over ordinary variables, whatever strategy made the original."""
    layers = []
    for layer in model.layers:
        input_size, output_size = layer.W.shape
        copy = NaiveDense(input_size, output_size, layer.activation, name=layer.name)
        copy.activation_name = layer.activation_name
        copy.W.assign(layer.W.read_value())
        copy.b.assign(layer.b.read_value())
        layers.append(copy)
    return NaiveSequential(layers, name=model.name)


def export_saved_model(model: NaiveSequential, input_size: int, path: str | Path) -> None:
    """Save `model` so that `tf.saved_model.load(path)` serves it without our code.

    The `serving_default` signature takes `inputs`, float32 [None, input_size],
    and returns `probabilities`, float32 [None, classes].
    """
    module = _ServingModule(_plain_copy(model), input_size)
    tf.saved_model.save(module, str(path), signatures={SIGNATURE: module.serve})


def load_saved_model(path: str | Path):
    """The `serving_default` function of an export: call it with inputs=..."""
    return tf.saved_model.load(str(path)).signatures[SIGNATURE]


def predict_saved_model(path_or_function, x: np.ndarray, *, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities, (examples, classes), for x of shape (examples, input_size)."""
    serve = path_or_function
    if isinstance(path_or_function, str | Path):
        serve = load_saved_model(path_or_function)
    x = np.asarray(x, dtype=np.float32)
    outputs = [
        serve(inputs=tf.constant(x[start : start + batch_size]))["probabilities"].numpy()
        for start in range(0, len(x), batch_size)
    ]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def evaluate_saved_model(path_or_function, x: np.ndarray, y: np.ndarray) -> Metrics:
    """Mean cross-entropy and accuracy of an export on (x, y)."""
    probs = predict_saved_model(path_or_function, x)  # (examples, classes)
    y = np.asarray(y, dtype=np.int64)
    if len(y) and y.max() >= probs.shape[1]:
        raise ValueError(
            f"labels go up to {int(y.max())} but the model has {probs.shape[1]} classes"
        )
    picked = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    loss = float(-np.mean(np.log(picked)))
    accuracy = float(np.mean(np.argmax(probs, axis=1) == y))
    return Metrics(loss=loss, accuracy=accuracy, examples=len(y))
