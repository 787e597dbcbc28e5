"""The inference worker seen from the server: one long-lived process for Evaluate and Predict.

`InferenceWorker` starts the process (service.worker.serving) when asked to
warm up or for the first task after it was found gone, sends it one task at a
time and hands back its answer. A task whose process died, or did not answer
in time (the process is then stopped), raises `WorkerGone`; the next task
starts a new process. Evaluate and Predict only read, so a task whose process
died may be sent again (`WorkerGone.may_retry`): a process killed while idle
is seen only when its socket closes, which may be after the task was sent.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path

from service.processes.shared_inputs import SharedInputs
from service.processes.worker_process import WorkerProcess, spawn_worker
from service.protocol import DescribeCache, EvaluateTask, Failed, PredictTask, WorkerEvent

log = logging.getLogger(__name__)

DEFAULT_MODEL_CACHE = 4


class WorkerGone(Exception):
    """The inference worker ended, or was stopped, before it answered; a new one starts next.

    may_retry: the process died (sending the task again to a new one may
        succeed); false when it hung past the timeout or the server is closing.
    """

    def __init__(self, message: str, *, may_retry: bool):
        super().__init__(message)
        self.may_retry = may_retry


class InferenceWorker:
    """The server's end of the inference worker. Thread-safe; tasks run one at a time.

    Args:
        model_cache: models the process keeps loaded (least recently used dropped first).
        cache_bytes: what their weights and its test splits may take; 0: no bound.
        log_path: the process's output (its own tracebacks too).
        dataset: (name, data_dir) of the data set whose test split it loads ahead.
        held_fds: descriptors it inherits and keeps open (the state directory's lock).
        temp_root: where its temporary folder goes (spawn_worker).
    """

    def __init__(
        self,
        *,
        model_cache: int = DEFAULT_MODEL_CACHE,
        cache_bytes: int = 0,
        log_path: Path | None = None,
        dataset: tuple[str, Path | None] | None = None,
        held_fds: tuple[int, ...] = (),
        temp_root: Path | None = None,
    ):
        if model_cache < 1:
            raise ValueError(f"model_cache must be at least 1, got {model_cache}")
        self.model_cache = model_cache
        self.cache_bytes = cache_bytes
        self.log_path = log_path
        self.dataset = dataset
        self.held_fds = held_fds
        self.temp_root = temp_root
        self.started = 0  # processes started so far
        self._task_lock = threading.Lock()  # held from sending a task to its answer
        self._lock = threading.Lock()  # guards _process and _closed
        self._process: WorkerProcess | None = None
        self._closed = False
        # Large Predict inputs, through shared memory; one file per worker process.
        self._shared = SharedInputs()
        self._shared_with: WorkerProcess | None = None

    @property
    def pid(self) -> int | None:
        """The running process's id; None before the first start or after it ended."""
        with self._lock:
            process = self._process
        return process.pid if process is not None and process.is_alive() else None

    @property
    def ready(self) -> bool:
        """Whether the process has TensorFlow imported and waits for a task, or answers one."""
        if not self._task_lock.acquire(blocking=False):
            return True  # answering a task: reading its pipe here would take the answer
        try:
            with self._lock:
                process = self._process
            return process is not None and process.is_alive() and process.ready
        finally:
            self._task_lock.release()

    def warm_up(self) -> None:
        """Start the process unless it runs (the server calls it when the machine is idle)."""
        with self._lock:
            if not self._closed:
                self._running()

    def run(self, task: EvaluateTask | PredictTask | DescribeCache, timeout: float) -> WorkerEvent:
        """The process's answer to `task`, waiting for the tasks ahead of it first.

        Raises:
            WorkerGone: the process ended before it answered, did not answer in
                `timeout` seconds (then it is stopped), or the server is closing.
        """
        with self._task_lock:
            with self._lock:
                if self._closed:
                    raise WorkerGone("the server is shutting down", may_retry=False)
                process = self._running()
            sent = self._with_shared_inputs(task, process)
            try:
                process.send(sent)
                event = process.receive(timeout)
            except (EOFError, OSError):
                ended = _ended(self._discard(process))
                raise WorkerGone(f"the inference worker {ended}", may_retry=True) from None
            finally:
                if sent is not task:  # the worker has the file mapped, or is gone
                    self._shared.answered()
            if event is None:
                self._discard(process)
                raise WorkerGone(
                    f"the inference worker did not answer in {timeout:.0f} s", may_retry=False
                )
            if sent is not task and isinstance(event, Failed):
                self._shared.close()  # it may have failed before mapping it: a new file next time
            return event

    def _with_shared_inputs(self, task, process: WorkerProcess):
        """`task`, its large Predict inputs moved to shared memory when that works."""
        if not isinstance(task, PredictTask):
            return task
        if self._shared_with is not process:  # a new process maps a new file
            self._shared.close()
            self._shared_with = process
        shared = self._shared.put(task.inputs)
        return task if shared is None else dataclasses.replace(task, inputs=shared)

    def close(self) -> None:
        """Stop the process, if any, and start no other (a task in flight gets WorkerGone)."""
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
        if process is not None:
            process.stop()

    def _running(self) -> WorkerProcess:
        """The live process, started anew when there is none (called under `_lock`)."""
        process = self._process
        if process is not None and process.is_alive():
            return process
        if process is not None:
            log.warning("the inference worker %s; starting another", _ended(process.stop()))
        self._process = spawn_worker(
            preload=True,
            log_path=self.log_path,
            dataset=self.dataset,
            held_fds=self.held_fds,
            model_cache=self.model_cache,
            cache_bytes=self.cache_bytes,
            temp_root=self.temp_root,
        )
        self.started += 1
        return self._process

    def _discard(self, process: WorkerProcess) -> int | None:
        """Stop a process that failed its task; the next task starts another."""
        code = process.stop()
        with self._lock:
            if self._process is process:
                self._process = None
        return code


def _ended(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
