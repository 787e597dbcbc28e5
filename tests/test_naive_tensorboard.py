"""naive_model's TensorBoard sink: what it writes, read back with TensorBoard's own loader."""

from __future__ import annotations

import shutil

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from naive_model.results import CheckpointSaved, EpochEnd, Progress, Resumed, TrainingResult
from naive_model.tensorboard import TensorBoardWriter, read_scalars

TAGS = {
    "train/loss",
    "train/accuracy",
    "train/examples_per_second",
    "train/learning_rate",
    "eval/loss",
    "eval/accuracy",
}


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard itself loads from `logdir`: tag -> [(step, value)], every point kept."""
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    return {
        tag: [
            (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
            for e in accumulator.Tensors(tag)
        ]  # fmt: skip
        for tag in accumulator.Tags()["tensors"]
    }


def _progress(step: int, steps_per_epoch: int = 4, **values) -> Progress:
    fields = dict(loss=1.0 / step, accuracy=step / 100, examples_per_second=1000.0 + step)
    fields.update(values)
    return Progress(
        epoch=(step - 1) // steps_per_epoch + 1,
        epochs=3,
        step=step,
        steps_per_epoch=steps_per_epoch,
        step_in_epoch=(step - 1) % steps_per_epoch + 1,
        examples=step * 32,
        **fields,
    )


def _epoch_end(epoch: int, evaluated: bool = True) -> EpochEnd:
    return EpochEnd(
        epoch=epoch,
        train_loss=0.5,
        train_accuracy=0.8,
        eval_loss=0.25 / epoch if evaluated else None,
        eval_accuracy=0.9 + epoch / 100 if evaluated else None,
        seconds=1.0,
    )


def test_every_tag_on_the_global_step_axis(tmp_path):
    events = [_progress(2), _progress(4), _epoch_end(1), _progress(6), _progress(8),
              _epoch_end(2, evaluated=False)]  # fmt: skip
    with TensorBoardWriter(tmp_path, learning_rate=0.001) as writer:
        for event in events:
            writer(event)
    # Written by one compiled function, traced once for training's tags and once for evaluation's.
    assert writer._write.experimental_get_tracing_count() == 2
    scalars = tensorboard_scalars(tmp_path)
    assert set(scalars) == TAGS
    progress = [e for e in events if isinstance(e, Progress)]
    steps = [p.step for p in progress]
    for tag, field in (("train/loss", "loss"), ("train/accuracy", "accuracy"),
                       ("train/examples_per_second", "examples_per_second")):  # fmt: skip
        assert [step for step, _ in scalars[tag]] == steps, tag
        expected = [getattr(p, field) for p in progress]
        assert [value for _, value in scalars[tag]] == pytest.approx(expected, rel=1e-6), tag
    assert scalars["train/learning_rate"] == [(s, pytest.approx(0.001)) for s in steps]
    # Epoch 2 was not evaluated: one evaluation, at epoch 1's last step.
    assert scalars["eval/loss"] == [(4, 0.25)]
    assert scalars["eval/accuracy"] == [(4, pytest.approx(0.91))]
    # The library's own reader agrees with TensorBoard's.
    assert read_scalars(tmp_path) == scalars


def test_without_a_learning_rate_none_is_written(tmp_path):
    with TensorBoardWriter(tmp_path) as writer:
        writer(_progress(1))
    assert "train/learning_rate" not in tensorboard_scalars(tmp_path)


def test_a_run_resumed_from_an_older_checkpoint_writes_no_step_twice(tmp_path):
    """The first run got to step 12 but its last checkpoint is at step 8 (epoch 2)."""
    with TensorBoardWriter(tmp_path, learning_rate=0.01) as first:
        for step in (4, 8, 12):
            first(_progress(step, steps_per_epoch=8))
            if step == 8:
                first(_epoch_end(1))
                first(CheckpointSaved(path="ckpt-1", epoch=1, step=8, seconds=0.1))
    with TensorBoardWriter(tmp_path, learning_rate=0.01) as resumed:
        resumed(Resumed(path="ckpt-1", epoch=1, step=8))
        for step in (12, 16):  # 12 again: replayed from the checkpoint
            resumed(_progress(step, steps_per_epoch=8, loss=99.0))
        resumed(_epoch_end(2))
        resumed(TrainingResult(train_loss=0.1, train_accuracy=0.9, test_loss=0.2,
                               test_accuracy=0.9, steps=16, train_seconds=1.0,
                               examples_per_second=100.0, has_model=False))  # fmt: skip
    scalars = tensorboard_scalars(tmp_path)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert [step for step, _ in scalars["train/loss"]] == [4, 8, 12, 16]
    # Step 12 is the first run's; only the new step 16 comes from the resumed one.
    losses = [value for _, value in scalars["train/loss"]]
    assert losses == pytest.approx([1 / 4, 1 / 8, 1 / 12, 99])
    assert [step for step, _ in scalars["eval/loss"]] == [8, 16]
    for tag, points in scalars.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), tag


def test_a_file_cut_off_mid_record_is_read_up_to_the_cut(tmp_path):
    """A worker killed while writing leaves half a record; what came before it counts."""
    with TensorBoardWriter(tmp_path) as writer:
        for step in (1, 2, 3):
            writer(_progress(step))
    (path,) = tmp_path.glob("events.out.tfevents.*")
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    losses = read_scalars(tmp_path)["train/loss"]
    assert [step for step, _ in losses] in ([1, 2], [1, 2, 3])  # the cut hit the last tag of 3
    with TensorBoardWriter(tmp_path) as again:  # and a resumed writer goes on past it
        again(_progress(4))
    assert [step for step, _ in read_scalars(tmp_path)["train/loss"]][-1] == 4


def test_a_missing_directory_reads_as_empty(tmp_path):
    assert read_scalars(tmp_path / "nothing") == {}


@pytest.mark.slow
def test_a_real_run_and_its_resumption_from_an_older_checkpoint(tmp_path):
    """run_training's own events, a worker killed after its last checkpoint, and the rerun."""
    from naive_model.config import LayerSpec, StrategyConfig, TrainConfig
    from naive_model.data import synthetic_dataset
    from naive_model.distribute import make_strategy
    from naive_model.loop import LoopOptions, run_training
    from naive_model.trainer import Trainer

    dataset = synthetic_dataset(num_train=256, num_test=64, input_size=32)
    strategy = make_strategy(StrategyConfig(kind="cpu"))
    layers = (LayerSpec(units=16, activation="relu"), LayerSpec(units=10, activation="softmax"))

    def trainer(epochs: int) -> Trainer:  # 4 steps an epoch, 2 a compiled call
        config = TrainConfig(layers=layers, batch_size=64, epochs=epochs, steps_per_execution=2,
                             learning_rate=0.01, seed=3)  # fmt: skip
        return Trainer(config, dataset, strategy)

    logdir, checkpoints, older = tmp_path / "tb", tmp_path / "ckpt", tmp_path / "older"
    first_events = []

    def first_sink(event) -> None:
        first_events.append(event)
        writer(event)
        if isinstance(event, CheckpointSaved) and event.epoch == 2:
            shutil.copytree(checkpoints, older)  # what a killed worker leaves: epoch 2's

    with TensorBoardWriter(logdir, learning_rate=0.01) as writer:
        run_training(trainer(3), LoopOptions(checkpoint_dir=checkpoints), on_event=first_sink)
    second_events = []
    with TensorBoardWriter(logdir, learning_rate=0.01) as writer:

        def second_sink(event) -> None:
            second_events.append(event)
            writer(event)

        run_training(trainer(4), LoopOptions(checkpoint_dir=older), on_event=second_sink)

    assert isinstance(second_events[0], Resumed) and second_events[0].step == 8
    scalars = tensorboard_scalars(logdir)
    assert set(scalars) == TAGS
    assert [step for step, _ in scalars["train/loss"]] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [step for step, _ in scalars["eval/accuracy"]] == [4, 8, 12, 16]
    # Steps 10 and 12 are written once, by the first run, and the rerun's equal them:
    # resuming is exact, so the axis reads as one uninterrupted run.
    written = dict(scalars["train/loss"])
    replayed = {e.step: e.loss for e in second_events if isinstance(e, Progress)}
    first = {e.step: e.loss for e in first_events if isinstance(e, Progress)}
    for step in (10, 12):
        assert written[step] == pytest.approx(first[step], rel=1e-6)
        assert replayed[step] == pytest.approx(first[step], rel=1e-5)
    assert written[16] == pytest.approx(replayed[16], rel=1e-6)
    evaluations = [e for e in first_events + second_events if isinstance(e, EpochEnd)]
    assert dict(scalars["eval/accuracy"])[16] == pytest.approx(evaluations[-1].eval_accuracy)
