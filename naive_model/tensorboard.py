"""TensorBoard event files from the outer loop's events: an optional event sink.

    writer = TensorBoardWriter("runs/mnist", learning_rate=config.learning_rate)
    with writer:
        run_training(trainer, options, on_event=writer)
    # then: tensorboard --logdir runs

Every scalar is on the global step axis (`Progress.step`), so the curves of a
run line up whatever its steps per compiled call:

    train/loss, train/accuracy    per compiled call: the epoch's running means
    train/examples_per_second     per compiled call
    train/learning_rate           per compiled call, when the writer is given one
    eval/loss, eval/accuracy      per evaluated epoch (`EpochEnd`), at its last step

A run that resumes from a checkpoint writes into the directory of the run it
continues. The writer first reads the last step each tag already holds there and
writes a tag only past it: a run resumed from a checkpoint older than its last
events (a process killed between two checkpoints) replays those steps without
writing them twice. Use a new directory for a run that starts afresh.

It is a plain callable: chain it beside another sink with a small function.
Host work between compiled calls, never inside one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import tensorflow as tf

from naive_model.results import (
    CheckpointSaved,
    EpochEnd,
    LoopEvent,
    Progress,
    Resumed,
    TrainingResult,
)

TRAIN_LOSS = "train/loss"
TRAIN_ACCURACY = "train/accuracy"
EXAMPLES_PER_SECOND = "train/examples_per_second"
LEARNING_RATE = "train/learning_rate"
EVAL_LOSS = "eval/loss"
EVAL_ACCURACY = "eval/accuracy"


class TensorBoardWriter:
    """Writes the loop's events as TensorBoard scalars in `logdir`.

    Args:
        logdir: the run's directory (made when missing); TensorBoard's
            `--logdir` is it or a folder above it.
        learning_rate: written beside each progress report; None writes none.
            (The optimizers here keep a constant rate.)
        flush_seconds: the longest time written scalars wait in memory; they
            are also flushed at each epoch's end, each checkpoint and the end.
    """

    def __init__(
        self,
        logdir: str | Path,
        *,
        learning_rate: float | None = None,
        flush_seconds: float = 10.0,
    ):
        self.logdir = Path(logdir)
        self.learning_rate = learning_rate
        # The steps an earlier run of this directory wrote: not written again.
        self._last_step = {tag: points[-1][0] for tag, points in read_scalars(logdir).items()}
        self._step = 0  # the global step of the last progress report
        self._writer = tf.summary.create_file_writer(
            str(self.logdir), flush_millis=int(flush_seconds * 1000)
        )
        self._write = tf.function(self._write_graph)

    def __call__(self, event: LoopEvent) -> None:
        if isinstance(event, Progress):
            self._step = event.step
            values = {
                TRAIN_LOSS: event.loss,
                TRAIN_ACCURACY: event.accuracy,
                EXAMPLES_PER_SECOND: event.examples_per_second,
            }
            if self.learning_rate is not None:
                values[LEARNING_RATE] = self.learning_rate
            self._scalars(values, event.step)
        elif isinstance(event, EpochEnd):
            if event.eval_loss is not None and event.eval_accuracy is not None:
                evaluation = {EVAL_LOSS: event.eval_loss, EVAL_ACCURACY: event.eval_accuracy}
                self._scalars(evaluation, self._step)
            self._writer.flush()
        elif isinstance(event, CheckpointSaved | TrainingResult):
            self._writer.flush()
        elif isinstance(event, Resumed):
            self._step = event.step

    def _scalars(self, values: Mapping[str, float], step: int) -> None:
        due = {tag: value for tag, value in values.items() if step > self._last_step.get(tag, -1)}
        if not due:
            return
        tags = tuple(due)
        self._write(tags, tf.constant(list(due.values()), tf.float32), tf.constant(step, tf.int64))
        for tag in tags:
            self._last_step[tag] = step

    def _write_graph(self, tags: tuple[str, ...], values: tf.Tensor, step: tf.Tensor) -> None:
        # Compiled (as self._write): eager tf.summary.scalar costs milliseconds a
        # value; one graph call writes a report's values for a fraction of that.
        # It traces once per tuple of tags (training's, evaluation's).
        with self._writer.as_default():
            for index, tag in enumerate(tags):
                tf.summary.scalar(tag, values[index], step=step)  # values: (len(tags),)

    def close(self) -> None:
        """Flush what is buffered and close the event file."""
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files directly in `logdir`: tag -> [(step, value)].

    Files are read in the order TensorBoard reads them (their names start with
    the time they were made); a file whose last record was cut off (its writer
    was killed) is read up to that record. A missing directory reads as empty.
    """
    logdir = Path(logdir)
    scalars: dict[str, list[tuple[int, float]]] = {}
    if not logdir.is_dir():
        return scalars
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        try:
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                for value in event.summary.value:
                    if not value.HasField("tensor"):
                        continue  # not written by tf.summary.scalar
                    number = float(tf.make_ndarray(value.tensor))
                    scalars.setdefault(value.tag, []).append((event.step, number))
        except tf.errors.DataLossError:
            continue  # a truncated last record: what came before it counts
    return scalars
