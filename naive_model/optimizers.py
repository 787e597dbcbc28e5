"""Keras optimizers by name."""

from __future__ import annotations

import keras

from naive_model.config import OPTIMIZERS, TrainConfig


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    """The Keras optimizer `config.optimizer` names, at `config.learning_rate`.

    float16 wraps it in Keras's LossScaleOptimizer: float16 gradients of a
    small loss underflow, so the loss is scaled up (`optimizer.scale_loss`)
    and the gradients down again, and steps with non-finite gradients are
    skipped while the scale adapts. bfloat16 has float32's range and needs
    none. Under a tf.distribute strategy, create and `build` it inside
    `strategy.scope()` before the training step is traced.
    """
    optimizer = _plain_optimizer(config)
    if config.precision == "float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _plain_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
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
