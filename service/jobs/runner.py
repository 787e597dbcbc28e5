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

from service.protocol import Failed, JobFiles, TrainingResult, TrainTask, WorkerEvent
from service.worker.process import WorkerProcess

log = logging.getLogger(__name__)

STOP_AFTER_ANSWER_SECONDS = 10.0
CANCELED = "canceled"  # the stop reason of a cancel request


class JobRunner:
    """Runs `task` in a worker from `take_worker` on a thread of its own.

    Args:
        on_event: called on the runner's thread with every event but the end.
        on_finish: called once, after the worker is gone, with the terminal
            state (SUCCEEDED, FAILED or CANCELED) and its reason.
    """

    def __init__(
        self,
        task: TrainTask,
        *,
        take_worker: Callable[[], WorkerProcess],
        on_event: Callable[[WorkerEvent], None],
        on_finish: Callable[[str, str], None],
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
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"runner-{self.job_id}", daemon=True)

    @property
    def run_seconds(self) -> float:
        return time.monotonic() - self._started

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self, reason: str) -> None:
        """End the job (`CANCELED` as the reason cancels it): kill its worker."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
            worker = self._worker
        if worker is not None:
            worker.kill()  # the runner thread sees EOF, reaps it and reports

    def _run(self) -> None:
        state, reason = "FAILED", "the job runner stopped unexpectedly"
        worker = None
        try:
            self.task.job_dir.mkdir(parents=True, exist_ok=True)
            worker = self._take_worker()
            with self._lock:
                self._worker = worker
                stopping = self._stop_reason is not None
            if stopping:
                worker.kill()
            state, reason = self._follow(worker)
        except Exception as error:  # a bug here must still end the job and free its devices
            log.exception("job runner for %s failed", self.job_id)
            reason = f"internal error: {error}"
        finally:
            if worker is not None:
                code = worker.wait(STOP_AFTER_ANSWER_SECONDS)
                if state == "FAILED" and reason.startswith("the worker exited"):
                    reason = worker_exit_reason(code, JobFiles(self.task.job_dir))
            with self._lock:
                if state == "SUCCEEDED":
                    pass  # the result was in before the stop: the model exists
                elif self._stop_reason == CANCELED:
                    state, reason = "CANCELED", CANCELED
                elif self._stop_reason is not None:
                    state, reason = "FAILED", self._stop_reason
            self._on_finish(state, reason)

    def _follow(self, worker: WorkerProcess) -> tuple[str, str]:
        """Send the task and forward the worker's events until it ends."""
        deadline = self._started + self._max_runtime if self._max_runtime else None
        try:
            worker.send(self.task)
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                event = worker.receive(timeout)
                if event is None:
                    self.stop(f"the job ran past its max_runtime_seconds of {self._max_runtime:g}")
                    continue
                if isinstance(event, Failed):
                    return "FAILED", event.reason
                self._on_event(event)
                if isinstance(event, TrainingResult):
                    return "SUCCEEDED", ""
        except (EOFError, OSError):
            return "FAILED", "the worker exited"


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
