"""Streaming: the training split read a window at a time from its files, in a seeded order.

The same compiled loop trains on each window; a run stopped mid-window and
resumed ends bitwise equal to one that never stopped.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

# Imported at collection, so that tests/conftest.py splits the CPU into the two
# logical devices the mirrored tests replicate over.
import tensorflow  # noqa: F401

from naive_model import streaming
from naive_model.config import LayerSpec, StrategyConfig, TrainConfig
from naive_model.formats import ConvertOptions, convert
from naive_model.streaming import (
    host_rows,
    map_canonical,
    read_block,
    read_rows,
    read_shard,
    window_block,
)

SMALL = (LayerSpec(units=32, activation="relu"), LayerSpec(units=10, activation="softmax"))


def _epoch(num_rows, window_rows, **seeds):
    """The rows of an epoch in the order they train."""
    windows = -(-num_rows // window_rows)
    blocks = [window_block(num_rows, window_rows, w, **seeds) for w in range(windows)]
    return np.concatenate([start + order for start, order in blocks])


def test_an_epoch_order_is_seeded_by_seed_and_epoch_and_visits_every_row_once():
    order = _epoch(1000, 128, seed=3, epoch=2)
    assert sorted(order) == list(range(1000))
    assert np.array_equal(order, _epoch(1000, 128, seed=3, epoch=2))
    assert not np.array_equal(order, _epoch(1000, 128, seed=3, epoch=3))
    # Each window is one block of 128 rows, shuffled; the short block comes last.
    for window in range(7):
        assert len(set(order[window * 128 : (window + 1) * 128] // 128)) == 1
    assert set(order[896:]) == set(range(896, 1000))
    assert np.array_equal(_epoch(10, 4, seed=0, epoch=1, shuffle=False), np.arange(10))


def test_rows_read_from_the_file_equal_rows_read_through_the_mapping(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (500, 7), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert np.array_equal(read_rows(mapped, 0, 300), x[:300])
    assert np.array_equal(read_rows(mapped, 300, 900), x[300:])  # past the end: to the end
    out = np.zeros((100, 7), dtype=np.uint8)
    assert read_rows(mapped, 200, 300, out=out) is out and np.array_equal(out, x[200:300])
    images, labels = read_block(mapped, np.arange(500), 400, 100, 128)  # the short last block
    assert np.array_equal(images[:100], x[400:])
    assert np.array_equal(labels[:100], np.arange(400, 500))
    assert not images[100:].any() and not labels[100:].any()  # past the rows: padding
    images, labels = read_block(x, np.arange(500), 128, 128, 128)  # an array in memory
    assert np.array_equal(images, x[128:256]) and np.array_equal(labels, np.arange(128, 256))


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_hosts_share_each_window_row_by_row_as_the_global_batches_cut_it(hosts):
    _, order = window_block(1000, 256, 1, seed=5, epoch=2)  # 8 steps of a global batch of 32
    shares = [host_rows(order, 32, host, hosts) for host in range(hosts)]
    assert all(len(share) == 256 // hosts for share in shares)
    assert sorted(np.concatenate(shares).tolist()) == list(range(256))  # each row once
    for step in range(8):  # host h's slice of step s is the h-th part of that global batch
        batch = order[step * 32 : (step + 1) * 32]
        per_host = 32 // hosts
        parts = [share[step * per_host : (step + 1) * per_host] for share in shares]
        assert np.array_equal(np.concatenate(parts), batch)


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("span_rows", [3, 1000])  # read through a buffer of 3 rows, or all
def test_a_share_holds_exactly_its_rows_and_pads_past_a_short_block(
    tmp_path, monkeypatch, in_memory, span_rows
):
    monkeypatch.setattr(streaming, "SHARE_BUFFER_BYTES", 7 * span_rows)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (500, 7), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(500, dtype=np.int64))
    images_file = x if in_memory else np.load(tmp_path / "x.npy", mmap_mode="r")
    labels_file = np.load(tmp_path / "y.npy", mmap_mode=None if in_memory else "r")
    order = np.concatenate([rng.permutation(100), np.arange(100, 128)])  # block at 400: 100 rows
    positions = host_rows(order, 32, 1, 2)  # (64,) some past the block's 100 rows
    images, labels, local = read_shard(images_file, labels_file, 400, 100, positions)
    assert images.shape == (64, 7) and labels.dtype == np.int64
    for trained, position in zip(local, positions, strict=True):  # what each step gathers
        if position < 100:
            assert np.array_equal(images[trained], x[400 + position])
            assert labels[trained] == 400 + position
        else:
            assert not images[trained].any() and labels[trained] == 0  # padding


@pytest.fixture(scope="module")
def mapped(tmp_path_factory):
    """A synthetic data set as a pushed file becomes: a canonical folder, memory-mapped."""
    from naive_model.data import synthetic_dataset

    data = synthetic_dataset(num_train=1000, num_test=200, input_size=64)
    folder = tmp_path_factory.mktemp("canonical")
    source = folder / "pair.npz"
    stream = io.BytesIO()
    np.savez(
        stream, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test
    )
    source.write_bytes(stream.getvalue())
    convert(source, folder / "out", ConvertOptions(format="npz"))
    return map_canonical(folder / "out")


def _trainer(data, *, strategy=None, **overrides):
    from naive_model.distribute import make_strategy
    from naive_model.trainer import Trainer

    window = overrides.pop("window_batches", 4)
    fields = dict(layers=SMALL, batch_size=32, optimizer="adam", epochs=2, seed=5)
    fields.update(overrides)
    strategy = strategy or make_strategy(StrategyConfig(kind="cpu"))
    return Trainer(TrainConfig(**fields), data, strategy, window_batches=window)


def _mirrored():
    from naive_model.distribute import make_strategy

    strategy = make_strategy(StrategyConfig(kind="mirrored", num_devices=2))
    assert strategy.num_replicas_in_sync == 2  # two logical CPUs (tests/conftest.py)
    return strategy


@pytest.mark.slow
def test_streaming_learns_as_the_in_memory_run_does(mapped):
    from naive_model.loop import run_training

    streamed = run_training(_trainer(mapped, epochs=3, learning_rate=0.01))
    held = run_training(_trainer(mapped, epochs=3, learning_rate=0.01, window_batches=None))
    assert streamed.steps == held.steps == 3 * (1000 // 32)
    print(f"test accuracy: streamed {streamed.test_accuracy}, in memory {held.test_accuracy}")
    assert streamed.test_accuracy > 0.9 and held.test_accuracy > 0.9
    assert abs(streamed.test_accuracy - held.test_accuracy) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_a_stop_mid_window_resumes_bitwise_equal(replicas, mapped, tmp_path):
    from naive_model.loop import LoopOptions, run_training
    from naive_model.results import Progress, Resumed
    from naive_model.trainer import TrainingStopped

    def trainer():
        return _trainer(
            mapped, strategy=_mirrored() if replicas == 2 else None, steps_per_execution=3
        )

    # 31 steps an epoch in windows of 4 batches, 3 steps a call (15 calls an epoch): the
    # 18th call ends at step 7 of epoch 2, inside its second window.
    straight = trainer()
    run_training(straight)

    events: list = []
    with pytest.raises(TrainingStopped):
        run_training(
            trainer(),
            LoopOptions(checkpoint_dir=tmp_path),
            on_event=events.append,
            should_stop=lambda: sum(isinstance(e, Progress) for e in events) >= 18,
        )
    resumed = trainer()
    resumed_events: list = []
    run_training(resumed, LoopOptions(checkpoint_dir=tmp_path), on_event=resumed_events.append)
    start = resumed_events[0]
    assert isinstance(start, Resumed) and start.step_in_epoch % 4 != 0  # mid-window
    for after, before in zip(resumed.model.weights, straight.model.weights, strict=True):
        np.testing.assert_array_equal(after.numpy(), before.numpy())


@pytest.mark.slow
def test_streaming_under_mirrored_replicas_trains_as_one_device_does(mapped):
    # Two replicas on logical CPUs: each window is assigned to every replica's copy of
    # the window variables, and each replica gathers its half of every batch from it.
    from naive_model.loop import run_training

    config = dict(epochs=2, steps_per_execution=3, learning_rate=0.01)
    mirrored = _trainer(mapped, strategy=_mirrored(), **config)
    one_device = _trainer(mapped, **config)
    results = [run_training(trainer) for trainer in (mirrored, one_device)]
    assert [r.steps for r in results] == [2 * (1000 // 32)] * 2
    for a, b in zip(mirrored.model.weights, one_device.model.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    assert results[0].test_accuracy == pytest.approx(results[1].test_accuracy, abs=0.01)
    copies = [value.numpy() for value in mirrored.model.weights[0].values]
    np.testing.assert_array_equal(copies[0], copies[1])  # the replicas agree
