"""What training and evaluation report: plain data, no tensors.

`Progress`, `EpochEnd`, `CheckpointSaved`, `Resumed` and `TrainingResult` are
the events of the outer loop (`naive_model.loop`); a runner (a notebook, the
service's worker, a Ray worker) receives them through one callback and turns
them into its own messages. Their fields are the service contract's too, so
nothing needs renaming on the way to a client.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metrics:
    """Mean loss and accuracy over `examples` examples."""

    loss: float
    accuracy: float
    examples: int


@dataclass(frozen=True, kw_only=True)
class Progress:
    """Reported once per compiled call of the training loop, never per step."""

    epoch: int  # 1-based epoch being trained
    epochs: int  # epochs the run trains in all
    step: int  # global step after this call
    steps_per_epoch: int
    step_in_epoch: int
    loss: float  # mean loss over the epoch so far
    accuracy: float  # accuracy over the epoch so far
    examples_per_second: float  # of this call
    examples: int  # examples trained so far, over every epoch (global step x batch)
    # This call alone; 0 in records written before these fields existed.
    call_steps: int = 0
    call_examples: int = 0
    call_seconds: float = 0.0


@dataclass(frozen=True)
class EpochResult:
    """What `Trainer.train_epoch` returns: the epoch's training loss and accuracy."""

    epoch: int
    loss: float
    accuracy: float
    steps: int
    examples: int
    seconds: float

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class EpochEnd:
    """An epoch trained, and evaluated when the loop's cadence asked for it.

    The eval fields are None on epochs the loop did not evaluate.
    """

    epoch: int
    train_loss: float
    train_accuracy: float
    eval_loss: float | None
    eval_accuracy: float | None
    seconds: float


@dataclass(frozen=True, kw_only=True)
class CheckpointSaved:
    path: str
    epoch: int  # epochs complete in the checkpoint
    step: int
    seconds: float  # time the save took
    step_in_epoch: int = 0  # > 0: taken mid-epoch, between two compiled calls


@dataclass(frozen=True, kw_only=True)
class Resumed:
    """The run continued from a checkpoint instead of starting afresh."""

    path: str
    epoch: int  # epochs complete in the checkpoint
    step: int
    step_in_epoch: int = 0  # > 0: the next epoch continues from this step
    # Newer checkpoints that did not read, each "ckpt-7 is damaged (why)".
    damaged: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # A tuple however it came (JSON, the Ray driver's event lines, gives a list).
        object.__setattr__(self, "damaged", tuple(self.damaged))

    def describe_fallback(self) -> str:
        """One line: which checkpoints were damaged, and the one resumed from ("" if none)."""
        if not self.damaged:
            return ""
        name = self.path.rsplit("/", 1)[-1]
        return "".join(f"checkpoint {item}; " for item in self.damaged) + f"resumed from {name}"


@dataclass(frozen=True, kw_only=True)
class TrainingResult:
    """The end of a run: last epoch's training figures and the final test evaluation."""

    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    steps: int
    train_seconds: float  # training time of this run (not counting a resumed run's past)
    examples_per_second: float  # steady rate: the first compiled call pays for tracing
    has_model: bool  # a SavedModel was exported
    run_steps: int | None = None  # steps of this run: fewer than `steps` after a resume


def steps_timed(steps: int, run_steps: int | None) -> str:
    """'N steps in', or after a resume 'N steps, the last M after resuming, in':
    the words before a result's seconds, which time only its last run.

    run_steps: the last run's steps; None when not known (an older result).
    """
    if run_steps is not None and run_steps < steps:
        return f"{steps} steps, the last {run_steps} after resuming, in"
    return f"{steps} steps in"


LoopEvent = Progress | EpochEnd | CheckpointSaved | Resumed | TrainingResult
