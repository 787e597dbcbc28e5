"""The outer loop: events in order, evaluation and checkpoint cadence, resume, stop, export.

A damaged newest checkpoint (five damages, as a full disk, a crash or a bad
sector leave it): the loop resumes from the newest intact one and says so in
one line; leftovers of interrupted saves and exports go when a run starts, and a
save or export that fails (a full disk) removes its own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from naive_model.config import LayerSpec, StrategyConfig, TrainConfig
from naive_model.data import synthetic_dataset
from naive_model.distribute import make_strategy
from naive_model.loop import LoopOptions, run_training
from naive_model.results import CheckpointSaved, EpochEnd, Progress, Resumed, TrainingResult
from naive_model.trainer import CheckpointDamaged, Trainer, TrainingDiverged, TrainingStopped
from service.worker.training_log import describe_event

pytestmark = pytest.mark.slow

SMALL = (LayerSpec(units=32, activation="relu"), LayerSpec(units=10, activation="softmax"))


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(num_train=512, num_test=128, input_size=64)


@pytest.fixture(scope="module")
def one_device():
    return make_strategy(StrategyConfig(kind="cpu"))


def _trainer(dataset, strategy, **overrides) -> Trainer:
    fields = dict(layers=SMALL, batch_size=64, optimizer="adam", epochs=3, seed=7)
    fields.update(overrides)
    return Trainer(TrainConfig(**fields), dataset, strategy)


def _kinds(events) -> list[str]:
    return [type(event).__name__ for event in events]


def test_events_come_in_order_with_the_asked_cadence(dataset, one_device, tmp_path):
    trainer = _trainer(dataset, one_device, steps_per_execution=4)  # 8 steps: 2 calls an epoch
    events = []
    options = LoopOptions(
        checkpoint_dir=tmp_path / "ckpt", checkpoint_every_epochs=2, evaluate_every_epochs=2
    )
    result = run_training(trainer, options, on_event=events.append)

    assert _kinds(events) == [
        *["Progress", "Progress", "EpochEnd"],
        *["Progress", "Progress", "EpochEnd", "CheckpointSaved"],
        *["Progress", "Progress", "EpochEnd", "CheckpointSaved"],  # the last epoch always saves
        "TrainingResult",
    ]
    ends = [event for event in events if isinstance(event, EpochEnd)]
    assert [end.epoch for end in ends] == [1, 2, 3]
    assert ends[0].eval_loss is None and ends[0].eval_accuracy is None  # not due
    assert ends[1].eval_accuracy is not None and ends[2].eval_accuracy is not None
    saves = [event for event in events if isinstance(event, CheckpointSaved)]
    assert [(save.epoch, save.step) for save in saves] == [(2, 16), (3, 24)]
    progress = [event for event in events if isinstance(event, Progress)]
    assert all(p.epochs == 3 for p in progress)
    assert [p.examples for p in progress] == [256 * n for n in range(1, 7)]
    assert events[-1] is result and isinstance(result, TrainingResult)
    assert result.steps == 24 and not result.has_model
    assert result.test_accuracy == pytest.approx(trainer.evaluate().accuracy)
    assert result.examples_per_second > 0


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(dataset, one_device, tmp_path):
    uninterrupted = _trainer(dataset, one_device, epochs=4)
    run_training(uninterrupted)

    first = _trainer(dataset, one_device, epochs=4)
    run_training(first, LoopOptions(epochs=2, checkpoint_dir=tmp_path))
    # A new process would build a new trainer: so does this test.
    second = _trainer(dataset, one_device, epochs=4)
    events = []
    result = run_training(second, LoopOptions(checkpoint_dir=tmp_path), on_event=events.append)

    assert isinstance(events[0], Resumed) and (events[0].epoch, events[0].step) == (2, 16)
    assert [e.epoch for e in events if isinstance(e, EpochEnd)] == [3, 4]
    assert result.steps == 32 and second.epoch == 4
    assert result.run_steps == 16  # the steps its train_seconds timed
    # The per-epoch order is seeded by (seed, epoch), so the resumed run is exact.
    for resumed, straight in zip(second.model.weights, uninterrupted.model.weights, strict=True):
        np.testing.assert_array_equal(resumed.numpy(), straight.numpy())


def test_resume_false_starts_afresh(dataset, one_device, tmp_path):
    run_training(_trainer(dataset, one_device, epochs=1), LoopOptions(checkpoint_dir=tmp_path))
    events = []
    trainer = _trainer(dataset, one_device, epochs=1)
    run_training(
        trainer, LoopOptions(checkpoint_dir=tmp_path, resume=False), on_event=events.append
    )
    assert not any(isinstance(event, Resumed) for event in events)
    assert trainer.global_step == 8


def test_a_stop_mid_epoch_saves_and_the_resumed_run_ends_exactly(dataset, one_device, tmp_path):
    uninterrupted = _trainer(dataset, one_device, steps_per_execution=2)
    straight = run_training(uninterrupted)

    trainer = _trainer(dataset, one_device, steps_per_execution=2)  # 4 calls an epoch
    events = []
    calls_before_stop = 5  # the first epoch's 4 calls, then one call of the second

    def should_stop() -> bool:
        return sum(isinstance(event, Progress) for event in events) >= calls_before_stop

    with pytest.raises(TrainingStopped) as stopped:
        run_training(
            trainer,
            LoopOptions(checkpoint_dir=tmp_path),
            on_event=events.append,
            should_stop=should_stop,
        )
    assert (stopped.value.epoch, stopped.value.step) == (2, 10)
    assert trainer.epoch == 1  # the unfinished epoch is not counted
    saves = [e for e in events if isinstance(e, CheckpointSaved)]
    assert [(s.epoch, s.step, s.step_in_epoch) for s in saves] == [(1, 8, 0), (1, 10, 2)]
    assert not any(isinstance(event, TrainingResult) for event in events)

    resumed_trainer = _trainer(dataset, one_device, steps_per_execution=2)
    resumed_events = []
    result = run_training(
        resumed_trainer, LoopOptions(checkpoint_dir=tmp_path), on_event=resumed_events.append
    )
    resumed = resumed_events[0]
    assert isinstance(resumed, Resumed)
    assert (resumed.epoch, resumed.step, resumed.step_in_epoch) == (1, 10, 2)
    first = next(e for e in resumed_events if isinstance(e, Progress))
    assert (first.epoch, first.step_in_epoch) == (2, 4)
    # The resumed epoch reports the whole epoch's loss, as the uninterrupted run did.
    assert result.train_loss == pytest.approx(straight.train_loss, rel=1e-6)
    for a, b in zip(resumed_trainer.model.weights, uninterrupted.model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_diverging_run_fails_within_one_call_and_exports_nothing(dataset, one_device, tmp_path):
    trainer = _trainer(dataset, one_device, optimizer="sgd", learning_rate=1e20)
    events = []
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at epoch 1, step \d+ "):
        run_training(trainer, LoopOptions(export_dir=tmp_path / "model"), on_event=events.append)
    assert not (tmp_path / "model").exists()
    assert not any(isinstance(event, EpochEnd) for event in events)


def test_long_epochs_also_checkpoint_every_few_seconds(dataset, one_device, tmp_path):
    trainer = _trainer(dataset, one_device, epochs=1, steps_per_execution=1)
    events = []
    options = LoopOptions(checkpoint_dir=tmp_path, checkpoint_seconds=1e-9)
    run_training(trainer, options, on_event=events.append)
    saves = [e.step_in_epoch for e in events if isinstance(e, CheckpointSaved)]
    assert saves == [1, 2, 3, 4, 5, 6, 7, 0]  # between every call, then the epoch's end


def test_export_is_atomic_and_serves_the_trained_model(dataset, one_device, tmp_path):
    trainer = _trainer(dataset, one_device, epochs=1)
    model_dir = tmp_path / "model"
    result = run_training(trainer, LoopOptions(export_dir=model_dir))
    assert result.has_model and (model_dir / "saved_model.pb").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # no staging left
    served = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    (probabilities,) = served(inputs=tf.constant(dataset.x_test[:4])).values()
    np.testing.assert_allclose(
        probabilities.numpy(), trainer.model(dataset.x_test[:4]).numpy(), rtol=1e-5, atol=1e-6
    )


def test_options_are_checked():
    with pytest.raises(ValueError, match="checkpoint_every_epochs"):
        LoopOptions(checkpoint_every_epochs=-1)
    with pytest.raises(ValueError, match="max_checkpoints"):
        LoopOptions(max_checkpoints=0)
    with pytest.raises(ValueError, match="checkpoint_seconds"):
        LoopOptions(checkpoint_seconds=0)


def test_a_stop_is_seen_between_epochs_of_one_call_each(dataset, one_device, tmp_path):
    """With a whole epoch per compiled call, the epoch's end is the call boundary."""
    trainer = _trainer(dataset, one_device, epochs=3, steps_per_execution=0)
    events = []

    def should_stop() -> bool:
        return any(isinstance(e, EpochEnd) for e in events)

    with pytest.raises(TrainingStopped) as stopped:
        run_training(
            trainer, LoopOptions(checkpoint_dir=tmp_path), on_event=events.append,
            should_stop=should_stop,
        )  # fmt: skip
    assert (stopped.value.epoch, trainer.epoch) == (2, 1)
    saves = [(e.epoch, e.step_in_epoch) for e in events if isinstance(e, CheckpointSaved)]
    assert saves == [(1, 0)]  # the epoch's due checkpoint, not saved twice


# -- damaged checkpoints and leftovers ---------------------------------------------------

DATA = "ckpt-24.data-00000-of-00001"


def _three_checkpoints(dataset, one_device, folder: Path) -> Path:
    """ckpt-8, ckpt-16 and ckpt-24: three epochs of 8 steps, one checkpoint each."""
    run_training(_trainer(dataset, one_device), LoopOptions(checkpoint_dir=folder))
    assert sorted(path.name for path in folder.glob("*.index")) == [
        "ckpt-16.index", "ckpt-24.index", "ckpt-8.index",
    ]  # fmt: skip
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 16):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated data file": lambda folder: _truncate(folder / DATA),
    "flipped bytes in the data file": lambda folder: _flip(folder / DATA),
    "flipped bytes in the index": lambda folder: _flip(folder / "ckpt-24.index"),
    "missing data file": lambda folder: (folder / DATA).unlink(),
    "missing index file": lambda folder: (folder / "ckpt-24.index").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(
    damage, dataset, one_device, tmp_path
):
    folder = _three_checkpoints(dataset, one_device, tmp_path / "ckpt")
    DAMAGES[damage](folder)

    events: list = []
    result = run_training(
        _trainer(dataset, one_device, epochs=4),
        LoopOptions(checkpoint_dir=folder),
        on_event=events.append,
    )
    [resumed] = [event for event in events if isinstance(event, Resumed)]
    line = describe_event(resumed)
    print(f"\n{damage}: {line}")
    assert resumed.path.endswith("ckpt-16") and (resumed.epoch, resumed.step) == (2, 16)
    assert line.startswith("checkpoint ckpt-24 is damaged (")
    assert "; resumed from ckpt-16; resumed from the checkpoint at epoch 2" in line
    assert "\n" not in line
    assert result.steps == 32  # epochs 3 and 4 trained again from ckpt-16
    assert list(folder.glob("ckpt-24.*.damaged"))  # set aside, not deleted
    # The save after the fallback wrote ckpt-24 and ckpt-32 anew: a later resume reads them.
    again = _trainer(dataset, one_device, epochs=4)
    assert again.restore_newest_intact(folder).path == str(folder / "ckpt-32")


def test_every_checkpoint_damaged_fails_with_one_line_naming_each(dataset, one_device, tmp_path):
    folder = _three_checkpoints(dataset, one_device, tmp_path / "ckpt")
    for path in folder.glob("*.data-*"):
        _truncate(path)
    with pytest.raises(CheckpointDamaged) as failed:
        run_training(_trainer(dataset, one_device, epochs=4), LoopOptions(checkpoint_dir=folder))
    message = str(failed.value)
    assert message.startswith(f"every checkpoint in {folder} is damaged: ckpt-24 is damaged (")
    assert "ckpt-16 is damaged (" in message and "ckpt-8 is damaged (" in message
    assert "\n" not in message


def test_leftovers_of_interrupted_saves_and_exports_are_removed_when_a_run_starts(
    dataset, one_device, tmp_path
):
    folder = _three_checkpoints(dataset, one_device, tmp_path / "ckpt")
    (folder / "ckpt-32_temp").mkdir()
    (folder / "ckpt-32_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x" * 99)
    (folder / "checkpoint.tmp1f2e3d").write_text("half")
    staging = tmp_path / ".model.tmp"
    staging.mkdir()
    (staging / "saved_model.pb").write_bytes(b"half")

    options = LoopOptions(checkpoint_dir=folder, export_dir=tmp_path / "model")
    events: list = []
    run_training(_trainer(dataset, one_device), options, on_event=events.append)
    assert not (folder / "ckpt-32_temp").exists()
    assert not (folder / "checkpoint.tmp1f2e3d").exists()
    assert not staging.exists()
    assert (tmp_path / "model" / "saved_model.pb").is_file()
    [resumed] = [event for event in events if isinstance(event, Resumed)]
    assert resumed.damaged == ()


def test_a_save_or_export_that_finds_no_room_leaves_nothing_half_written(
    dataset, one_device, tmp_path
):
    """A job that fails on a full disk is never run again: its run cleans up there."""
    no_room = tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    def save_half(folder: Path, max_to_keep: int) -> str:
        (folder / "ckpt-8_temp").mkdir(parents=True)
        (folder / "ckpt-8_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
        (folder / "checkpoint.tmp9a8b").write_text("half")
        raise no_room

    trainer = _trainer(dataset, one_device)
    trainer.save_checkpoint = save_half  # type: ignore[method-assign]
    folder = tmp_path / "ckpt"
    with pytest.raises(tf.errors.ResourceExhaustedError):
        run_training(trainer, LoopOptions(checkpoint_dir=folder))
    assert list(folder.iterdir()) == []

    def export_half(path: Path) -> None:
        path.mkdir()
        (path / "saved_model.pb").write_bytes(b"half")
        raise no_room

    trainer = _trainer(dataset, one_device, epochs=1)
    trainer.export = export_half  # type: ignore[method-assign]
    with pytest.raises(tf.errors.ResourceExhaustedError):
        run_training(trainer, LoopOptions(export_dir=tmp_path / "model"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ckpt"]
