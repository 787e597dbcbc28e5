"""The runner contract: what the control loop asks of whatever runs a job's training.

A runner runs one job somewhere (a local worker process, a Ray job) on a
thread of its own and reports back through two callbacks: each worker event
as it comes, then exactly one typed `RunOutcome`. It makes no decision about
the job: the control loop tells it to stop (`stop`: end now; `request_stop`:
checkpoint at the next compiled-call boundary and end) and decides what the
outcome means (a restart, a failure, a job left to resume on the next start).

`RunnerThread` holds what every runner would repeat: the thread, the stop
latch, turning a stop into the outcome, and the one call of `on_end`, even
when the runner itself fails. An implementation says only how it starts,
follows and stops its work (`_follow`, `_end_now`, `_ask_to_stop`).
"""

from __future__ import annotations

import enum
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from service.protocol import WorkerEvent

log = logging.getLogger(__name__)


class RunEnd(enum.Enum):
    """How a run ended, before the control loop decides what that means for the job."""

    SUCCEEDED = "succeeded"  # the training result came in
    FAILED = "failed"  # the task failed, or the runner was stopped for a reason
    CANCELED = "canceled"  # stopped by a cancel
    STOPPED = "stopped"  # checkpointed and ended on request: the job resumes later
    WORKER_DIED = "worker died"  # ended without a word (killed, out of memory)


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, and why in one line."""

    end: RunEnd
    reason: str = ""


@dataclass(frozen=True)
class Stop:
    """Why the control loop ends a run now: what it reports, unless it had finished first."""

    end: RunEnd  # CANCELED or FAILED
    reason: str


CANCEL = Stop(RunEnd.CANCELED, "canceled")


class Runner(Protocol):
    """What the control loop holds of a running job."""

    job_id: str

    def start(self) -> None: ...

    def stop(self, stop: Stop) -> None:
        """End the run now; it reports `stop` as its outcome unless it had finished."""

    def request_stop(self, reason: str = "") -> None:
        """Ask the run to checkpoint at its next compiled-call boundary and end (STOPPED).

        reason: why, in a few words, for the job's own log.
        """

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


# What the control loop gives a runner to report with.
OnEvent = Callable[[WorkerEvent], None]
OnEnd = Callable[[RunOutcome], None]


class RunnerThread(ABC):
    """A runner on a thread of its own: the plumbing every implementation shares.

    Args:
        on_event: called on the runner's thread with every event but the end.
        on_end: called once, last, with the outcome.
    """

    def __init__(self, job_id: str, *, on_event: OnEvent, on_end: OnEnd, kind: str):
        self.job_id = job_id
        self._on_event = on_event
        self._on_end = on_end
        self._lock = threading.Lock()
        self._stop: Stop | None = None
        self._stop_requested = False
        self._stop_reason = ""
        self._thread = threading.Thread(target=self._run, name=f"{kind}-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, stop: Stop) -> None:
        with self._lock:
            if self._stop is None:
                self._stop = stop
        self._end_now()

    def request_stop(self, reason: str = "") -> None:
        with self._lock:
            self._stop_requested = True
            self._stop_reason = reason
        self._ask_to_stop()

    @property
    def stop_reason(self) -> str:
        """Why a stop was requested ("" when none was, or no reason was given)."""
        with self._lock:
            return self._stop_reason

    @property
    def stopping(self) -> Stop | None:
        """The stop asked for, if any."""
        with self._lock:
            return self._stop

    @property
    def stop_requested(self) -> bool:
        with self._lock:
            return self._stop_requested

    def _run(self) -> None:
        outcome = RunOutcome(RunEnd.FAILED, "the job runner stopped unexpectedly")
        try:
            outcome = self._follow()
        except Exception as error:  # a bug here must still end the job and free its devices
            log.exception("runner for %s failed", self.job_id)
            outcome = RunOutcome(RunEnd.FAILED, f"internal error: {error}")
        finally:
            stop = self.stopping
            # A result (or a requested checkpoint) that came in before the stop stands.
            if stop is not None and outcome.end not in (RunEnd.SUCCEEDED, RunEnd.STOPPED):
                outcome = RunOutcome(stop.end, stop.reason)
            self._on_end(outcome)

    @abstractmethod
    def _follow(self) -> RunOutcome:
        """Start the work, forward its events, and return once it has ended for good."""

    @abstractmethod
    def _end_now(self) -> None:
        """Make `_follow` return soon: the stop latch is set."""

    @abstractmethod
    def _ask_to_stop(self) -> None:
        """Ask the work to checkpoint and end (`stop_requested` is set)."""
