"""One line of train.log per event of the training loop, for `ntrain logs -f`.

The worker's stderr is the job's train.log; without these lines it would hold
only the worker's set-up and TensorFlow's own output. Each line is what a
person following the log wants to read: where the run is and how it goes.
"""

from __future__ import annotations

from naive_model.results import (
    CheckpointSaved,
    EpochEnd,
    LoopEvent,
    Progress,
    Resumed,
    TrainingResult,
    steps_timed,
)


def describe_event(event: LoopEvent) -> str:
    """The event as one line of the training log (no time stamp: the caller adds it)."""
    match event:
        case Progress():
            return (
                f"epoch {event.epoch}/{event.epochs} step {event.step_in_epoch}/"
                f"{event.steps_per_epoch} (global {event.step}): loss {event.loss:.4f} "
                f"accuracy {event.accuracy:.2%}, {event.examples_per_second:,.0f} examples/s"
            )
        case EpochEnd():
            line = (
                f"epoch {event.epoch} ended after {event.seconds:.2f} s: train loss "
                f"{event.train_loss:.4f} accuracy {event.train_accuracy:.2%}"
            )
            if event.eval_loss is not None and event.eval_accuracy is not None:
                line += (
                    f"; evaluation loss {event.eval_loss:.4f} accuracy {event.eval_accuracy:.2%}"
                )
            return line
        case CheckpointSaved():
            where = f"epoch {event.epoch}" + (
                f" + {event.step_in_epoch} steps" if event.step_in_epoch else ""
            )
            return (
                f"checkpoint saved at {where} (global step {event.step}) "
                f"in {event.seconds:.2f} s: {event.path}"
            )
        case Resumed():
            where = f"epoch {event.epoch}" + (
                f" + {event.step_in_epoch} steps" if event.step_in_epoch else ""
            )
            line = (
                f"resumed from the checkpoint at {where} (global step {event.step}): {event.path}"
            )
            return f"{event.describe_fallback()}; {line}" if event.damaged else line
        case TrainingResult():
            return (
                f"training finished: test loss {event.test_loss:.4f} accuracy "
                f"{event.test_accuracy:.2%}; {steps_timed(event.steps, event.run_steps)} "
                f"{event.train_seconds:.2f} s, "
                f"{event.examples_per_second:,.0f} examples/s; "
                + ("model exported" if event.has_model else "no model exported")
            )
    raise TypeError(f"not a loop event: {event!r}")
