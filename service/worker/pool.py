"""Worker processes seen from the server: spawning, the warm pool, and ending them.

Every worker is a fresh process from the "spawn" start method (never fork: the
server has threads, and a forked TensorFlow is not safe), so a crash or an
out-of-memory kill takes only that worker down, and its GPU memory is freed
when it ends. `WorkerPool` keeps one warm worker, with TensorFlow imported,
ready while the machine is idle, so the next job does not pay the import.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from service.worker import run_worker

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")
STOP_GRACE_SECONDS = 5.0


class WorkerProcess:
    """One spawned worker and the server's end of its pipe."""

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection, warm: bool):
        self.process = process
        self.conn = conn
        self.warm = warm
        self._ready = not warm

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ready(self) -> bool:
        """Whether a warm worker has finished importing TensorFlow."""
        if not self._ready and self.process.is_alive() and self.conn.poll(0):
            kind, _ = self.conn.recv()
            self._ready = kind == "ready"
        return self._ready

    def send(self, task: dict[str, Any]) -> None:
        self.conn.send(task)

    def receive(self, timeout: float | None = None) -> tuple[str, Any] | None:
        """The worker's next message; None after `timeout` seconds without one.

        Raises:
            EOFError: the worker is gone (it ended, crashed or was killed).
        """
        while True:
            if timeout is not None and not self.conn.poll(timeout):
                return None
            kind, data = self.conn.recv()
            if kind == "ready":  # a warm worker's hello; the task follows
                self._ready = True
                continue
            return kind, data

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """End the process (SIGTERM, then SIGKILL after `grace`) and reap it.

        Returns:
            Its exit code: negative for the signal that ended it.
        """
        if self.process.is_alive():
            self.process.join(0.0)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()
        return self.process.exitcode

    def wait(self, timeout: float) -> int | None:
        """Let a worker that sent its last message exit by itself, then reap it."""
        self.process.join(timeout)
        return self.stop()


def spawn_worker(
    *,
    preload: bool,
    log_path: Path | None = None,
    dataset: tuple[str, str | None] | None = None,
) -> WorkerProcess:
    """Start a worker process; with `preload` it imports TensorFlow right away.

    Args:
        log_path: the file for the worker's output until its task names one.
        dataset: (name, data_dir) of a data set a warm worker loads while it waits.
    """
    parent_end, child_end = _SPAWN.Pipe(duplex=True)
    process = _SPAWN.Process(
        target=run_worker,
        args=(child_end, preload, None if log_path is None else str(log_path), dataset),
        name="ntrain-warm-worker" if preload else "ntrain-worker",
        daemon=True,
    )
    process.start()
    child_end.close()  # so that the server sees EOF when the worker ends
    return WorkerProcess(process, parent_end, warm=preload)


class WorkerPool:
    """Hands out workers: the warm one when there is one, else a fresh cold one."""

    def __init__(
        self,
        *,
        warm: bool = True,
        log_path: Path | None = None,
        dataset: tuple[str, str | None] | None = None,
    ):
        self.warm_enabled = warm
        self.log_path = log_path
        self.dataset = dataset
        self._lock = threading.Lock()
        self._warm: WorkerProcess | None = None
        self._closed = False

    @property
    def warm_ready(self) -> int:
        """1 when a warm worker has TensorFlow imported and waits for a task, else 0."""
        with self._lock:
            worker = self._warm
            return int(worker is not None and worker.process.is_alive() and worker.ready)

    def take(self) -> WorkerProcess:
        """A worker for one task; the caller sends it the task and stops it after."""
        with self._lock:
            worker, self._warm = self._warm, None
        if worker is not None and worker.process.is_alive():
            return worker  # even one still importing is ahead of a cold start
        if worker is not None:
            log.warning("the warm worker died (exit code %s); starting a cold one", worker.stop())
        return spawn_worker(preload=False, log_path=self.log_path)

    def refill(self) -> None:
        """Start a warm worker unless one is there (call it when the machine is idle)."""
        with self._lock:
            if self._closed or not self.warm_enabled:
                return
            if self._warm is not None and self._warm.process.is_alive():
                return
            if self._warm is not None:
                self._warm.stop()
            self._warm = spawn_worker(preload=True, log_path=self.log_path, dataset=self.dataset)

    def close(self) -> None:
        """Stop the warm worker, if any, and start no other."""
        with self._lock:
            self._closed = True
            worker, self._warm = self._warm, None
        if worker is not None:
            worker.stop()
