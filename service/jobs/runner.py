"""The thread that runs one job in one worker process.

A runner knows nothing of the manager: it is given the task, a way to get a
worker, a callback for each worker event and one for the end. It sends the
task, forwards the worker's typed events, enforces the run-time limit, and
ends the process (really: reaped, devices released) before it reports the
job's terminal state.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.processes.worker_process import WorkerProcess
from service.protocol import (
    Failed,
    JobFiles,
    Stopped,
    StopTraining,
    TrainingResult,
    TrainTask,
    WorkerEvent,
)

log = logging.getLogger(__name__)

STOP_AFTER_ANSWER_SECONDS = 10.0
CANCELED = "canceled"  # the stop reason of a cancel request


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended.

    state: SUCCEEDED, FAILED or CANCELED; INTERRUPTED when the worker stopped
        on request (the server is shutting down) and the job resumes later.
    worker_died: the worker ended without a word (killed, out of memory):
        restarting it from its checkpoint may well succeed.
    """

    state: str
    reason: str = ""
    worker_died: bool = False


INTERRUPTED = "INTERRUPTED"


class JobRunner:
    """Runs `task` in a worker from `take_worker` on a thread of its own.

    Args:
        on_event: called on the runner's thread with every event but the end.
        on_finish: called once, after the worker is gone, with the outcome.
    """

    def __init__(
        self,
        task: TrainTask,
        *,
        take_worker: Callable[[], WorkerProcess],
        on_event: Callable[[WorkerEvent], None],
        on_finish: Callable[[RunOutcome], None],
        max_runtime_seconds: float = 0.0,
    ):
        self.task = task
        self.job_id = task.job_id
        self._take_worker = take_worker
        self._on_event = on_event
        self._on_finish = on_finish
        self._max_runtime = max_runtime_seconds
        self._lock = threading.Lock()
        self._worker: WorkerProcess | None = None
        self._stop_reason: str | None = None
        self._stop_requested = False
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"runner-{self.job_id}", daemon=True)

    @property
    def run_seconds(self) -> float:
        return time.monotonic() - self._started

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, reason: str) -> None:
        """End the job now (`CANCELED` as the reason cancels it): kill its worker."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
            worker = self._worker
        if worker is not None:
            worker.kill()  # the runner thread sees EOF, reaps it and reports

    def request_stop(self) -> None:
        """Ask the worker to checkpoint at its next compiled-call boundary and end."""
        with self._lock:
            self._stop_requested = True
            worker = self._worker
        if worker is not None:
            try:
                worker.send(StopTraining())
            except OSError:
                pass  # it is gone already; the runner thread reports that

    def _run(self) -> None:
        outcome = RunOutcome("FAILED", "the job runner stopped unexpectedly")
        worker = None
        try:
            self.task.job_dir.mkdir(parents=True, exist_ok=True)
            worker = self._take_worker()
            with self._lock:
                self._worker = worker
                stopping = self._stop_reason is not None
                stop_requested = self._stop_requested
            if stopping:
                worker.kill()
            outcome = self._follow(worker, stop_requested)
        except Exception as error:  # a bug here must still end the job and free its devices
            log.exception("job runner for %s failed", self.job_id)
            outcome = RunOutcome("FAILED", f"internal error: {error}")
        finally:
            if worker is not None:
                code = worker.wait(STOP_AFTER_ANSWER_SECONDS)
                if outcome.worker_died:
                    reason = worker_exit_reason(code, JobFiles(self.task.job_dir))
                    outcome = RunOutcome("FAILED", reason, worker_died=True)
            with self._lock:
                if outcome.state in ("SUCCEEDED", INTERRUPTED):
                    pass  # the result (or the requested checkpoint) was in before any stop
                elif self._stop_reason == CANCELED:
                    outcome = RunOutcome("CANCELED", CANCELED)
                elif self._stop_reason is not None:
                    outcome = RunOutcome("FAILED", self._stop_reason)
            self._on_finish(outcome)

    def _follow(self, worker: WorkerProcess, stop_requested: bool) -> RunOutcome:
        """Send the task and forward the worker's events until it ends."""
        deadline = self._started + self._max_runtime if self._max_runtime else None
        try:
            worker.send(self.task)
            if stop_requested:  # asked before the worker was there
                worker.send(StopTraining())
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                event = worker.receive(timeout)
                if event is None:
                    self.stop(f"the job ran past its max_runtime_seconds of {self._max_runtime:g}")
                    continue
                if isinstance(event, Failed):
                    return RunOutcome("FAILED", event.reason)
                if isinstance(event, Stopped):
                    return RunOutcome(INTERRUPTED, f"stopped in epoch {event.epoch}")
                self._on_event(event)
                if isinstance(event, TrainingResult):
                    return RunOutcome("SUCCEEDED")
        except (EOFError, OSError):
            return RunOutcome("FAILED", "the worker exited", worker_died=True)


def worker_exit_reason(code: int | None, files: JobFiles) -> str:
    """Why a worker ended without a result, with the last line of its log."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        reason = f"the worker process was killed by {name}{hint}"
    else:
        reason = f"the worker process exited with code {code}"
    if files.train_log.is_file():
        lines = files.train_log.read_text(errors="replace").splitlines()
        tail = [line for line in lines if line.strip()]
        if tail:
            reason += f"; its log ends: {tail[-1][:300]}"
    return reason
