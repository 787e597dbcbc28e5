"""What training and evaluation report: plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metrics:
    """Mean loss and accuracy over `examples` examples."""

    loss: float
    accuracy: float
    examples: int


@dataclass(frozen=True)
class Progress:
    """Reported once per compiled call of the training loop, never per step."""

    epoch: int  # 1-based epoch being trained
    step: int  # global step after this call
    step_in_epoch: int
    steps_per_epoch: int
    steps: int  # steps run by this call
    examples: int  # examples trained by this call
    loss: float  # mean loss over the epoch so far
    accuracy: float  # accuracy over the epoch so far
    seconds: float  # wall time of this call

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    loss: float
    accuracy: float
    steps: int
    examples: int
    seconds: float

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0
