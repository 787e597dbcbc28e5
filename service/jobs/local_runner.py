"""Runs one job in a worker process on this host: the local `Runner`.

It takes a worker (warm or cold), sends it the task, forwards its typed
events, and reaps the process before it reports how the run ended, so a job
never reports a terminal state while its worker may still hold its devices.
Ending the run is ending the process: `stop` kills it (its pipe then closes),
`request_stop` asks it to checkpoint at its next compiled-call boundary.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

from service.jobs.runner import OnEnd, OnEvent, RunEnd, RunnerThread, RunOutcome
from service.processes.worker_process import WorkerProcess
from service.protocol import (
    Failed,
    JobFiles,
    Stopped,
    StopTraining,
    TrainingResult,
    TrainTask,
)

# How long a worker that sent its last message may take to exit by itself.
STOP_AFTER_ANSWER_SECONDS = 10.0


class LocalRunner(RunnerThread):
    """Runs `task` in a worker from `take_worker`."""

    def __init__(
        self,
        task: TrainTask,
        *,
        take_worker: Callable[[], WorkerProcess],
        on_event: OnEvent,
        on_end: OnEnd,
    ):
        super().__init__(task.job_id, on_event=on_event, on_end=on_end, kind="runner")
        self.task = task
        self._take_worker = take_worker
        self._worker: WorkerProcess | None = None

    def _end_now(self) -> None:
        with self._lock:
            worker = self._worker
        if worker is not None:
            worker.kill()  # _follow sees EOF, reaps it and reports

    def _ask_to_stop(self) -> None:
        with self._lock:
            worker = self._worker
        if worker is not None:
            try:
                worker.send(StopTraining(self.stop_reason))
            except OSError:
                pass  # it is gone already; _follow reports that

    def _follow(self) -> RunOutcome:
        self.task.job_dir.mkdir(parents=True, exist_ok=True)
        try:
            worker = self._take_worker()
        except (EOFError, OSError) as error:  # a worker that died as it started, a failed fork
            return RunOutcome(RunEnd.WORKER_DIED, f"could not start a worker: {error}")
        with self._lock:
            self._worker = worker
            stopping = self._stop is not None
            stop_requested = self._stop_requested
        try:
            if stopping:  # stopped while the worker was being taken
                worker.kill()
            outcome = self._forward(worker, stop_requested)
        finally:
            code = worker.wait(STOP_AFTER_ANSWER_SECONDS)
        if outcome.end is RunEnd.WORKER_DIED:
            reason = worker_exit_reason(code, JobFiles(self.task.job_dir))
            return RunOutcome(RunEnd.WORKER_DIED, reason)
        return outcome

    def _forward(self, worker: WorkerProcess, stop_requested: bool) -> RunOutcome:
        """Send the task and forward the worker's events until it ends."""
        try:
            worker.send(self.task)
            if stop_requested:  # asked before the worker was there
                worker.send(StopTraining(self.stop_reason))
            while True:
                event = worker.receive()
                if isinstance(event, Failed):
                    return RunOutcome(RunEnd.FAILED, event.reason)
                if isinstance(event, Stopped):
                    return RunOutcome(
                        RunEnd.STOPPED,
                        f"stopped in epoch {event.epoch} at global step {event.step}",
                    )
                if event is not None:
                    self._on_event(event)
                if isinstance(event, TrainingResult):
                    return RunOutcome(RunEnd.SUCCEEDED)
        except (EOFError, OSError):
            return RunOutcome(RunEnd.WORKER_DIED, "the worker exited")


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
