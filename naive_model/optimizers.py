"""Keras optimizers by name."""

from __future__ import annotations

import keras

from naive_model.config import OPTIMIZERS, TrainConfig


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    """The Keras optimizer `config.optimizer` names, at `config.learning_rate`.

    Under a tf.distribute strategy, create and `build` it inside
    `strategy.scope()` before the training step is traced.
    """
    rate = config.learning_rate
    if config.optimizer in ("sgd", "momentum"):
        return keras.optimizers.SGD(learning_rate=rate, momentum=config.effective_momentum)
    if config.optimizer == "adagrad":
        return keras.optimizers.Adagrad(learning_rate=rate)
    if config.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=rate)
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=rate)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
