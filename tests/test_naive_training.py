"""The compiled, distributed loop against the book's eager step."""

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from naive_model.config import LayerSpec, StrategyConfig, TrainConfig
from naive_model.data import from_arrays, synthetic_dataset
from naive_model.distribute import make_strategy
from naive_model.eager import evaluate, fit, one_training_step
from naive_model.layers import build_model
from naive_model.optimizers import make_optimizer
from naive_model.trainer import Trainer

pytestmark = pytest.mark.slow

# float32 sums in a different order (fused kernels, in-graph loop, replica
# reduction) drift by a few ulps per step; after 8 steps weights agree to 1e-5.
WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
SMALL = (LayerSpec(units=32, activation="relu"), LayerSpec(units=10, activation="softmax"))


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(num_train=1024, num_test=256, input_size=64)


@pytest.fixture(scope="module")
def one_device():
    return make_strategy(StrategyConfig(kind="cpu"))


def _config(**overrides):
    fields = dict(layers=SMALL, batch_size=64, optimizer="sgd", learning_rate=0.1, shuffle=False)
    fields.update(overrides)
    return TrainConfig(**fields)


def _weights(model):
    return [w.numpy() for w in model.weights]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adagrad", "rmsprop", "adam"])
def test_compiled_loop_matches_the_eager_step(dataset, one_device, optimizer):
    config = _config(optimizer=optimizer, learning_rate=0.01, steps_per_execution=8)
    trainer = Trainer(config, dataset, one_device)
    model = build_model(dataset.input_size, config.layers, initializer=config.initializer)
    keras_optimizer = make_optimizer(config)
    np.testing.assert_array_equal(_weights(model)[0], _weights(trainer.model)[0])

    trainer._start_epoch(1)
    trainer._train_loop(tf.constant(0, tf.int64), tf.constant(8, tf.int64))
    for step in range(8):
        batch = slice(step * 64, (step + 1) * 64)
        one_training_step(
            model, dataset.x_train[batch], dataset.y_train[batch], optimizer=keras_optimizer
        )
    for compiled, eager in zip(_weights(trainer.model), _weights(model), strict=True):
        np.testing.assert_allclose(compiled, eager, **WEIGHT_TOLERANCE)


def test_hand_update_is_plain_sgd(dataset):
    config = _config(learning_rate=0.05)
    by_hand = build_model(dataset.input_size, config.layers)
    with_sgd = build_model(dataset.input_size, config.layers)
    sgd = make_optimizer(config)
    images, labels = dataset.x_train[:64], dataset.y_train[:64]
    for _ in range(3):
        one_training_step(by_hand, images, labels, learning_rate=0.05)
        one_training_step(with_sgd, images, labels, optimizer=sgd)
    for a, b in zip(_weights(by_hand), _weights(with_sgd), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mirrored_over_two_logical_cpus_matches_one_device(dataset, one_device):
    mirrored = make_strategy(StrategyConfig(kind="mirrored", num_devices=2))
    assert mirrored.num_replicas_in_sync == 2
    config = _config(optimizer="adam", learning_rate=0.01, shuffle=True, steps_per_execution=5)
    single = Trainer(config, dataset, one_device)
    replicated = Trainer(config, dataset, mirrored)
    single_epoch = single.train_epoch()
    replicated_epoch = replicated.train_epoch()
    for a, b in zip(_weights(single.model), _weights(replicated.model), strict=True):
        np.testing.assert_allclose(a, b, **WEIGHT_TOLERANCE)
    assert replicated_epoch.loss == pytest.approx(single_epoch.loss, rel=1e-5)
    assert replicated_epoch.accuracy == pytest.approx(single_epoch.accuracy, abs=2 / 1024)
    # Every replica holds the same weights.
    w = replicated.model.weights[0]
    copies = [v.numpy() for v in w.values]
    np.testing.assert_array_equal(copies[0], copies[1])


def test_uint8_images_stay_uint8_on_the_device_and_train_exactly_as_float32(one_device):
    rng = np.random.default_rng(0)
    pixels = from_arrays(
        "pixels",
        rng.integers(0, 256, (512, 8, 8), dtype=np.uint8),
        rng.integers(0, 10, 512),
        rng.integers(0, 256, (64, 8, 8), dtype=np.uint8),
        rng.integers(0, 10, 64),
    )
    floats = dataclasses.replace(pixels, x_train_uint8=None)  # the same values, as float32
    config = _config(optimizer="adam", learning_rate=0.01, shuffle=True)
    on_uint8, on_float32 = Trainer(config, pixels, one_device), Trainer(config, floats, one_device)
    assert on_uint8._images.dtype == tf.uint8 and on_float32._images.dtype == tf.float32
    assert on_uint8._labels.dtype == tf.int64
    assert pixels.info.feature_bytes == 1 and floats.info.feature_bytes == 4
    scale = tf.function(lambda: on_uint8._to_compute_dtype(tf.gather(on_uint8._images, [0, 1])))
    np.testing.assert_array_max_ulp(scale().numpy(), floats.x_train[:2], maxulp=1)
    on_uint8.train_epoch()
    on_float32.train_epoch()
    for a, b in zip(_weights(on_uint8.model), _weights(on_float32.model), strict=True):
        np.testing.assert_allclose(a, b, **WEIGHT_TOLERANCE)
    assert on_uint8.evaluate().accuracy == on_float32.evaluate().accuracy


def test_batch_not_divisible_by_replicas_is_refused(dataset):
    mirrored = make_strategy(StrategyConfig(kind="mirrored", num_devices=2))
    with pytest.raises(ValueError, match="batch_size must be divisible by the replica count 2"):
        Trainer(_config(batch_size=63), dataset, mirrored)


def test_each_epoch_trains_on_a_new_order_of_every_example(dataset):
    mirrored = make_strategy(StrategyConfig(kind="mirrored", num_devices=2))
    trainer = Trainer(_config(shuffle=True), dataset, mirrored)
    orders = []
    for epoch in (1, 2, 3):
        trainer._start_epoch(epoch)
        for copy in trainer._order.values:  # every replica draws the same order
            assert sorted(copy.numpy()) == list(range(len(dataset.x_train)))
            np.testing.assert_array_equal(copy.numpy(), trainer._order.values[0].numpy())
        orders.append(trainer._order.numpy())
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])


def test_the_training_loop_traces_once(dataset, one_device):
    # 16 steps per epoch in calls of 5: the calls run 5, 5, 5 and 1 steps.
    trainer = Trainer(_config(steps_per_execution=5), dataset, one_device)
    calls = []
    trainer.fit(2, on_progress=calls.append)
    assert [p.call_steps for p in calls] == [5, 5, 5, 1] * 2
    assert trainer.trace_count == 1
    assert trainer.global_step == 32 and trainer.epoch == 2


def test_a_short_first_call_reports_early_without_retracing(dataset, one_device):
    trainer = Trainer(_config(steps_per_execution=0), dataset, one_device)
    calls = []
    trainer.train_epoch(calls.append, first_call_steps=1)
    trainer.train_epoch(calls.append)
    assert [p.call_steps for p in calls] == [1, 15, 16]
    assert trainer.trace_count == 1


def test_progress_is_reported_once_per_call(dataset, one_device):
    trainer = Trainer(_config(steps_per_execution=4), dataset, one_device)
    calls = []
    result = trainer.train_epoch(calls.append)
    assert len(calls) == 4
    assert [p.step_in_epoch for p in calls] == [4, 8, 12, 16]
    assert calls[-1].loss == pytest.approx(result.loss)
    assert all(p.epoch == 1 and p.steps_per_epoch == 16 and p.call_examples == 256 for p in calls)
    # The run's count so far: the global step times the global batch.
    assert [p.examples for p in calls] == [256, 512, 768, 1024]


def test_loss_and_accuracy_match_a_separate_evaluation(dataset, one_device):
    config = _config(epochs=3, steps_per_execution=0)
    trainer = Trainer(config, dataset, one_device)
    trainer.fit()
    library = trainer.evaluate()
    book = evaluate(trainer.model, dataset.x_test, dataset.y_test)
    assert library.loss == pytest.approx(book.loss, rel=1e-5)
    assert library.accuracy == book.accuracy
    assert library.accuracy > 0.9  # the synthetic set is learnable


@pytest.mark.parametrize("replicas", [1, 2])
def test_jit_compile_gives_the_same_weights(dataset, one_device, replicas):
    strategy = one_device
    if replicas == 2:
        strategy = make_strategy(StrategyConfig(kind="mirrored", num_devices=2))
    plain = Trainer(_config(steps_per_execution=4), dataset, one_device)
    jitted = Trainer(_config(steps_per_execution=4, jit_compile=True), dataset, strategy)
    plain.train_epoch()
    jitted.train_epoch()
    for a, b in zip(_weights(plain.model), _weights(jitted.model), strict=True):
        np.testing.assert_allclose(a, b, **WEIGHT_TOLERANCE)


def test_xla_takes_the_whole_loop_on_one_device_and_the_gradients_over_logical_cpus(
    dataset, one_device
):
    compiled = tf.types.experimental.PolymorphicFunction
    one = Trainer(_config(jit_compile=True), dataset, one_device)
    # One XLA program for the whole call: the steps' while loop, each batch's
    # slice and gather, the update and the accumulators.
    hlo = one._train_loop.experimental_get_compiler_ir(
        tf.constant(0, tf.int64), tf.constant(4, tf.int64)
    )(stage="hlo")
    assert " while(" in hlo and "gather(" in hlo
    mirrored = make_strategy(StrategyConfig(kind="mirrored", num_devices=2))
    split = Trainer(_config(jit_compile=True), dataset, mirrored)
    # Logical CPUs all-reduce through merge_call, outside XLA: only the gradients are jitted.
    # (Over GPUs the whole step is, all-reduce included: not run here, there is no GPU.)
    assert split._learn == split._learn_batch and isinstance(split._gradients, compiled)
    with pytest.raises(ValueError):  # the loop itself is a plain graph
        split._train_loop.experimental_get_compiler_ir(
            tf.constant(0, tf.int64), tf.constant(4, tf.int64)
        )


def test_eager_switch_gives_the_same_weights(dataset, one_device):
    compiled = Trainer(_config(steps_per_execution=4), dataset, one_device)
    eager = Trainer(_config(steps_per_execution=4), dataset, one_device, eager=True)
    compiled.train_epoch()
    eager.train_epoch()
    for a, b in zip(_weights(compiled.model), _weights(eager.model), strict=True):
        np.testing.assert_allclose(a, b, **WEIGHT_TOLERANCE)


def test_the_books_fit_loop_learns(dataset):
    model = build_model(dataset.input_size, SMALL, initializer="glorot")
    epochs = []
    losses = fit(
        model,
        dataset.x_train,
        dataset.y_train,
        epochs=3,
        batch_size=64,
        learning_rate=0.1,
        on_epoch_end=lambda e, loss: epochs.append(e),
    )
    assert epochs == [1, 2, 3] and losses[2] < losses[0]


def test_checkpoint_restores_model_optimizer_and_progress(dataset, one_device, tmp_path):
    config = _config(optimizer="adam", learning_rate=0.01, shuffle=True)
    trainer = Trainer(config, dataset, one_device)
    for _ in range(3):
        trainer.train_epoch()
        trainer.save_checkpoint(tmp_path, max_to_keep=2)
    assert len(tf.train.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths) == 2
    resumed = Trainer(config, dataset, one_device)
    assert resumed.restore_checkpoint(tmp_path).endswith("ckpt-48")
    assert resumed.epoch == 3 and resumed.global_step == 48
    for a, b in zip(_weights(trainer.model), _weights(resumed.model), strict=True):
        np.testing.assert_array_equal(a, b)
    # Resuming continues exactly where the original would have gone.
    trainer.train_epoch()
    resumed.train_epoch()
    for a, b in zip(_weights(trainer.model), _weights(resumed.model), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert Trainer(config, dataset, one_device).restore_checkpoint(tmp_path / "none") is None


def test_export_loads_without_this_projects_code(dataset, one_device, tmp_path):
    trainer = Trainer(_config(), dataset, one_device)
    trainer.train_epoch()
    trainer.export(tmp_path / "model")
    np.save(tmp_path / "x.npy", dataset.x_test[:20])
    # A fresh interpreter with only TensorFlow: no naive_model on the path.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", ".")]
        import numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({str(tmp_path / "model")!r})
        serve = loaded.signatures["serving_default"]
        spec = serve.structured_input_signature[1]["inputs"]
        assert spec.dtype == tf.float32 and spec.shape.as_list() == [None, 64], spec
        out = serve(inputs=tf.constant(np.load({str(tmp_path / "x.npy")!r})))["probabilities"]
        np.save({str(tmp_path / "p.npy")!r}, out.numpy())
        assert "naive_model" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    exported = np.load(tmp_path / "p.npy")
    expected = tf.nn.softmax(trainer.model.logits(dataset.x_test[:20])).numpy()
    np.testing.assert_allclose(exported, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exported.sum(axis=1), 1.0, rtol=1e-5)
