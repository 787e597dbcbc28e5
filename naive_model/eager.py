"""The book's eager training: one GradientTape step per batch, in Python."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from naive_model.data import BatchGenerator
from naive_model.layers import NaiveSequential
from naive_model.losses import per_example_loss
from naive_model.results import Metrics


def update_weights(gradients, weights, *, learning_rate: float = 1e-3, optimizer=None) -> None:
    """Apply gradients: by hand (w -= g * learning_rate), or with a Keras optimizer."""
    if optimizer is None:
        for gradient, weight in zip(gradients, weights, strict=True):
            weight.assign_sub(gradient * learning_rate)
    else:
        optimizer.apply_gradients(zip(gradients, weights, strict=True))


def one_training_step(
    model: NaiveSequential,
    images_batch,
    labels_batch,
    *,
    learning_rate: float = 1e-3,
    optimizer: keras.optimizers.Optimizer | None = None,
) -> tf.Tensor:
    """Forward on a GradientTape, mean cross-entropy, gradients, update; returns the loss."""
    with tf.GradientTape() as tape:
        losses, _ = per_example_loss(model, images_batch, labels_batch)  # (batch,)
        average_loss = tf.reduce_mean(losses)
    gradients = tape.gradient(average_loss, model.weights)
    update_weights(gradients, model.weights, learning_rate=learning_rate, optimizer=optimizer)
    return average_loss


def fit(
    model: NaiveSequential,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 5,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    optimizer: keras.optimizers.Optimizer | None = None,
    shuffle: bool = False,
    seed: int = 0,
    on_epoch_end: Callable[[int, float], None] | None = None,
) -> list[float]:
    """The book's fit loop; returns the mean loss of each epoch.

    Args:
        on_epoch_end: called with (epoch, mean loss) after each epoch.
    """
    batches = BatchGenerator(images, labels, batch_size, shuffle=shuffle, seed=seed)
    epoch_losses = []
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for images_batch, labels_batch in batches:
            loss = one_training_step(
                model,
                images_batch,
                labels_batch,
                learning_rate=learning_rate,
                optimizer=optimizer,
            )
            total += float(loss) * len(labels_batch)
            count += len(labels_batch)
        epoch_losses.append(total / count)
        if on_epoch_end is not None:
            on_epoch_end(epoch, epoch_losses[-1])
    return epoch_losses


def evaluate(
    model: NaiveSequential, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 1024
) -> Metrics:
    """Mean loss and accuracy of the model over every example."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(images), batch_size):
        images_batch = images[start : start + batch_size]
        labels_batch = labels[start : start + batch_size]
        losses, scores = per_example_loss(model, images_batch, labels_batch)
        loss_sum += float(tf.reduce_sum(losses))
        correct += int(np.sum(np.argmax(scores.numpy(), axis=1) == labels_batch))
    return Metrics(
        loss=loss_sum / len(images), accuracy=correct / len(images), examples=len(images)
    )
