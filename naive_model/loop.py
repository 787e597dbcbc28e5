"""The outer training loop: epochs, evaluation, checkpoints, resume and export.

In the manner of Orbit's `Controller`, kept apart from the step (`Trainer`):
this module decides when to train, evaluate, checkpoint, export and stop; the
`Trainer` runs the compiled calls. Every runner uses it (a notebook, the
service's worker process, a Ray worker), so they all train the same way, and
each turns the typed events it receives into its own messages. It never prints.

    result = run_training(trainer, LoopOptions(checkpoint_dir="ckpt"), on_event=print)
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from naive_model.leftovers import export_staging, remove_leftovers
from naive_model.results import (
    CheckpointSaved,
    EpochEnd,
    LoopEvent,
    Progress,
    Resumed,
    TrainingResult,
)
from naive_model.trainer import Trainer, TrainingStopped


@dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """When the loop evaluates, checkpoints and exports.

    epochs: epochs the run trains in all, counting those a resumed checkpoint
        already holds (None: the trainer's config).
    evaluate_every_epochs: evaluate on the test split every N epochs (0: only
        the final evaluation, which always runs).
    checkpoint_dir: where checkpoints go; None saves none and resumes from none.
    checkpoint_every_epochs: save every N epochs (0: only at the end, which
        always saves when there is a checkpoint_dir).
    checkpoint_seconds: also save between compiled calls once this many
        seconds passed since the last save (long epochs); None: never mid-epoch.
    max_checkpoints: how many of the newest checkpoints to keep.
    resume: continue from the newest checkpoint in checkpoint_dir, if any.
    export_dir: write the final SavedModel here (atomically); None exports nothing.
    first_call_steps: a short first compiled call, so the first progress comes
        right after tracing.
    """

    epochs: int | None = None
    evaluate_every_epochs: int = 1
    checkpoint_dir: str | Path | None = None
    checkpoint_every_epochs: int = 1
    checkpoint_seconds: float | None = None
    max_checkpoints: int = 3
    resume: bool = True
    export_dir: str | Path | None = None
    first_call_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("evaluate_every_epochs", "checkpoint_every_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be 0 or a positive integer, got {value!r}")
        if self.checkpoint_seconds is not None and not self.checkpoint_seconds > 0:
            raise ValueError(
                f"checkpoint_seconds must be positive or None, got {self.checkpoint_seconds!r}"
            )
        if self.max_checkpoints < 1:
            raise ValueError(f"max_checkpoints must be at least 1, got {self.max_checkpoints!r}")


def _due(epoch: int, every: int, last_epoch: int) -> bool:
    return epoch == last_epoch or bool(every and epoch % every == 0)


def run_training(
    trainer: Trainer,
    options: LoopOptions | None = None,
    *,
    on_event: Callable[[LoopEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainingResult:
    """Train to the last epoch, reporting every happening to `on_event`.

    Events, in order: `Resumed` (when a checkpoint was restored), then per
    epoch a `Progress` per compiled call, an `EpochEnd`, a `CheckpointSaved`
    when one is due (and between calls when `checkpoint_seconds` passed);
    finally the `TrainingResult`, which is also returned.

    Args:
        should_stop: asked between compiled calls (an epoch's end included);
            True saves a checkpoint there (when there is a checkpoint_dir) and
            ends the run.

    Raises:
        TrainingStopped: `should_stop` returned True; the checkpoint saved
            then resumes mid-epoch.
        TrainingDiverged: the loss became NaN or infinite; nothing is saved
            or exported after it.
    """
    options = options or LoopOptions()
    emit = on_event or (lambda event: None)
    last_epoch = options.epochs or trainer.config.epochs
    checkpoint_dir = Path(options.checkpoint_dir) if options.checkpoint_dir else None

    remove_leftovers(checkpoint_dir, options.export_dir)
    if checkpoint_dir is not None and options.resume:
        restored = trainer.restore_newest_intact(checkpoint_dir)
        if restored.path is not None:
            emit(
                Resumed(
                    path=restored.path,
                    epoch=trainer.epoch,
                    step=trainer.global_step,
                    step_in_epoch=trainer.step_in_epoch,
                    damaged=restored.damaged,
                )
            )

    first_step = trainer.global_step  # after a resume, the step it resumed at
    last_save = time.monotonic()
    saved_step = -1  # the global step of the last checkpoint this run saved

    def save() -> None:
        nonlocal last_save, saved_step
        assert checkpoint_dir is not None
        if saved_step == trainer.global_step:
            return  # saved at this very step already (an epoch's due checkpoint)
        start = time.perf_counter()
        try:
            path = trainer.save_checkpoint(checkpoint_dir, max_to_keep=options.max_checkpoints)
        except Exception:
            # A full disk: the run ends here, and a job that is not run again
            # would keep the half-written shards for good.
            remove_leftovers(checkpoint_dir, None)
            raise
        last_save = time.monotonic()
        saved_step = trainer.global_step
        emit(
            CheckpointSaved(
                path=path,
                epoch=trainer.epoch,
                step=trainer.global_step,
                seconds=time.perf_counter() - start,
                step_in_epoch=trainer.step_in_epoch,
            )
        )

    def stop_if_asked() -> None:
        if should_stop is not None and should_stop():
            if checkpoint_dir is not None:
                save()
            raise TrainingStopped(trainer.epoch + 1, trainer.global_step)

    def between_calls() -> None:
        stop_if_asked()
        seconds = options.checkpoint_seconds
        if checkpoint_dir is not None and seconds and time.monotonic() - last_save >= seconds:
            save()

    steady = _SteadyRate()

    def on_progress(progress: Progress) -> None:
        steady.add(progress)
        emit(dataclasses.replace(progress, epochs=last_epoch))

    train_seconds = 0.0
    last = None
    while trainer.epoch < last_epoch:
        # Between epochs is between compiled calls too: with a whole epoch per
        # call, it is the only place a stop is seen.
        stop_if_asked()
        epoch = trainer.epoch + 1
        last = trainer.train_epoch(
            on_progress,
            first_call_steps=options.first_call_steps if steady.calls == 0 else None,
            between_calls=between_calls,
        )
        train_seconds += last.seconds
        evaluation = (
            trainer.evaluate() if _due(epoch, options.evaluate_every_epochs, last_epoch) else None
        )
        emit(
            EpochEnd(
                epoch=epoch,
                train_loss=last.loss,
                train_accuracy=last.accuracy,
                eval_loss=None if evaluation is None else evaluation.loss,
                eval_accuracy=None if evaluation is None else evaluation.accuracy,
                seconds=last.seconds,
            )
        )
        if checkpoint_dir is not None and _due(epoch, options.checkpoint_every_epochs, last_epoch):
            save()

    if options.export_dir is not None:
        export_atomically(trainer, Path(options.export_dir))
    final = trainer.evaluate()
    result = TrainingResult(
        train_loss=last.loss if last is not None else float("nan"),
        train_accuracy=last.accuracy if last is not None else float("nan"),
        test_loss=final.loss,
        test_accuracy=final.accuracy,
        steps=trainer.global_step,
        train_seconds=train_seconds,
        examples_per_second=steady.rate(fallback=last.examples_per_second if last else 0.0),
        has_model=options.export_dir is not None,
        run_steps=trainer.global_step - first_step,
    )
    emit(result)
    return result


def export_atomically(trainer: Trainer, path: Path) -> None:
    """Write the SavedModel beside `path`, then rename: a reader never sees half of it."""
    staging = export_staging(path)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        trainer.export(staging)
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)


class _SteadyRate:
    """Examples per second over every compiled call but the first, which traces."""

    def __init__(self) -> None:
        self.calls = 0
        self._examples = 0
        self._seconds = 0.0

    def add(self, progress: Progress) -> None:
        self.calls += 1
        if self.calls > 1:
            self._examples += progress.call_examples
            self._seconds += progress.call_seconds

    def rate(self, fallback: float) -> float:
        return self._examples / self._seconds if self._seconds > 0 else fallback
