"""Mixed precision: float32 weights and optimizer state, a cast compute dtype, float32 loss."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from naive_model.config import LayerSpec, StrategyConfig, TrainConfig
from naive_model.data import load_mnist, synthetic_dataset
from naive_model.distribute import make_strategy
from naive_model.layers import build_model
from naive_model.losses import per_example_loss
from naive_model.trainer import Trainer

pytestmark = pytest.mark.slow

SMALL = (LayerSpec(units=32, activation="relu"), LayerSpec(units=10, activation="softmax"))


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(num_train=1024, num_test=256, input_size=64)


@pytest.fixture(scope="module")
def one_device():
    return make_strategy(StrategyConfig(kind="cpu"))


def _config(**overrides) -> TrainConfig:
    fields = dict(layers=SMALL, batch_size=64, optimizer="adam", learning_rate=0.01, epochs=2)
    fields.update(overrides)
    return TrainConfig(**fields)


def test_layers_compute_in_the_inputs_dtype_and_the_loss_in_float32(dataset):
    model = build_model(dataset.input_size, SMALL)
    images = tf.cast(dataset.x_train[:8], tf.bfloat16)
    assert model.logits(images).dtype == tf.bfloat16
    losses, scores = per_example_loss(model, images, tf.constant(dataset.y_train[:8], tf.int64))
    assert losses.dtype == scores.dtype == tf.float32
    # bfloat16 keeps 8 bits of mantissa: the logits agree with float32 to about 1%.
    np.testing.assert_allclose(
        scores.numpy(), model.logits(dataset.x_train[:8]).numpy(), rtol=0.05, atol=0.05
    )


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_weights_and_optimizer_state_stay_float32_and_training_learns(
    dataset, one_device, precision
):
    trainer = Trainer(_config(precision=precision), dataset, one_device)
    assert trainer.compute_dtype == getattr(tf, precision)
    trainer.fit()
    assert all(weight.dtype == tf.float32 for weight in trainer.model.weights)
    assert all(variable.dtype in (tf.float32, tf.int64) for variable in trainer.optimizer.variables)
    assert trainer.global_step == 2 * trainer.steps_per_epoch
    assert trainer.evaluate().accuracy > 0.9  # the synthetic set is learnable
    if precision == "float16":
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    else:
        assert not isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)


# What reduced precision may cost against float32 over one epoch of the small model:
# bfloat16 keeps 8 bits of mantissa, so single weights differ by more than their
# updates (a per-weight tolerance over an epoch fails on some weight by chance);
# what holds is the training itself: its mean loss and what it learned.
LOSS_BOUND = 0.05  # relative, to float32's mean loss over the epoch
ACCURACY_AFTER_ONE_EPOCH = 0.85  # on the synthetic set's test split; it is learnable


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mirrored_and_xla_run_in_reduced_precision(dataset, one_device, precision):
    mirrored = make_strategy(StrategyConfig(kind="mirrored", num_devices=2))
    reference = Trainer(_config(epochs=1), dataset, one_device)
    trainers = {
        "one device": Trainer(_config(precision=precision, epochs=1), dataset, one_device),
        "mirrored": Trainer(_config(precision=precision, epochs=1), dataset, mirrored),
        "xla": Trainer(
            _config(precision=precision, epochs=1, jit_compile=True), dataset, one_device
        ),
    }
    float32_loss = reference.train_epoch().loss
    for path, trainer in trainers.items():
        assert trainer.compute_dtype == getattr(tf, precision), path
        loss = trainer.train_epoch().loss
        assert loss == pytest.approx(float32_loss, rel=LOSS_BOUND), path
        assert trainer.evaluate().accuracy > ACCURACY_AFTER_ONE_EPOCH, path
        assert all(weight.dtype == tf.float32 for weight in trainer.model.weights), path
    # The replicas hold one set of weights, whatever the rounding.
    for weight in trainers["mirrored"].model.weights:
        copies = [value.numpy() for value in weight.values]
        np.testing.assert_array_equal(copies[0], copies[1])


def test_bfloat16_mnist_accuracy_is_within_0_3_points_of_float32(mnist_path, one_device):
    mnist = load_mnist(mnist_path, download=False)
    accuracy = {}
    for precision in ("float32", "bfloat16"):
        trainer = Trainer(TrainConfig(epochs=2, precision=precision), mnist, one_device)
        trainer.fit()
        accuracy[precision] = trainer.evaluate().accuracy
    print(f"\nMNIST test accuracy after 2 epochs (the book's network, RMSprop): {accuracy}")
    assert accuracy["float32"] > 0.96
    assert abs(accuracy["bfloat16"] - accuracy["float32"]) <= 0.003
