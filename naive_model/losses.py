"""The loss the book trains with: mean sparse categorical cross-entropy."""

from __future__ import annotations

import keras
import tensorflow as tf

from naive_model.layers import NaiveSequential

# Last activations whose pre-activation output can be treated as logits.
_LOGIT_ACTIVATIONS = ("softmax", "linear")


def per_example_loss(
    model: NaiveSequential, images: tf.Tensor, labels: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Cross-entropy per example, and scores whose argmax is the predicted class.

    When the last layer is a softmax, the loss is computed from its logits:
    the same value as the book's cross-entropy of the probabilities, but
    without their clipping and cheaper (one fused op). Images in a reduced
    precision (bfloat16, float16) run the layers in it; the logits return to
    float32 before the last activation and the loss.

    Returns:
        (losses, scores): shapes (batch,) and (batch, classes), float32.
    """
    last = model.layers[-1]
    logits = tf.cast(model.logits(images), tf.float32)  # (batch, classes)
    if last.activation_name in _LOGIT_ACTIVATIONS:
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        return losses, logits
    outputs = last.activation(logits)  # (batch, classes)
    return keras.losses.sparse_categorical_crossentropy(labels, outputs), outputs


def probabilities(model: NaiveSequential, images: tf.Tensor) -> tf.Tensor:
    """Class probabilities, summing to one per example."""
    last = model.layers[-1]
    if last.activation_name in _LOGIT_ACTIVATIONS:
        return tf.nn.softmax(model.logits(images))  # (batch, classes)
    outputs = model(images)  # (batch, classes)
    return outputs / tf.reduce_sum(outputs, axis=-1, keepdims=True)
