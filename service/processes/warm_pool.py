"""The warm pool: workers with TensorFlow imported, ready before a job needs one.

`WorkerPool` hands out the oldest warm worker, so the next job does not pay
the import, or a cold one when there is none. It holds one while the machine
is idle, and two while a search has more trials to come (`refill(count)`).
Every worker it starts reports its resident size once TensorFlow is imported
(`Ready.resident_bytes`), and the pool keeps the largest: what the runtime
takes in this install, which admission counts for each job
(`WorkerPool.runtime_bytes`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from naive_model.config import RUNTIME_FALLBACK_BYTES
from service.processes.worker_process import WorkerProcess, spawn_worker

log = logging.getLogger(__name__)


class WorkerPool:
    """Hands out workers: the warm one when there is one, else a fresh cold one."""

    def __init__(
        self,
        *,
        warm: bool = True,
        log_path: Path | None = None,
        dataset: tuple[str, Path | None] | None = None,
        held_fds: tuple[int, ...] = (),
        temp_root: Path | None = None,
    ):
        self.warm_enabled = warm
        self.held_fds = held_fds
        self.temp_root = temp_root  # where workers' temporary folders go (spawn_worker)
        self.log_path = log_path
        self.dataset = dataset
        self._lock = threading.Lock()
        self._warm: list[WorkerProcess] = []  # the oldest first: the likeliest to be ready
        self._closed = False
        # The largest runtime a worker reported, 0 before the first. Its own lock:
        # a Ready is read (and reported here) while `_lock` is held, in warm_ready.
        self._runtime_lock = threading.Lock()
        self._runtime_bytes = 0

    @property
    def runtime_bytes(self) -> int:
        """A worker's resident bytes after its imports: the largest measured so far.

        Before any worker has reported (the warm worker is still importing, or
        is disabled and no job has run yet), `RUNTIME_FALLBACK_BYTES`, which is
        above every install measured; with the warm worker disabled the first
        job's cold worker measures it.
        """
        with self._runtime_lock:
            return self._runtime_bytes or RUNTIME_FALLBACK_BYTES

    def _measured(self, resident_bytes: int) -> None:
        with self._runtime_lock:
            self._runtime_bytes = max(self._runtime_bytes, resident_bytes)

    @property
    def warm_ready(self) -> int:
        """How many warm workers have TensorFlow imported and wait for a task."""
        with self._lock:
            return sum(1 for worker in self._warm if worker.is_alive() and worker.ready)

    def take(self) -> WorkerProcess:
        """A worker for one task; the caller sends it the task and stops it after."""
        with self._lock:
            warm, self._warm = self._warm[:1], self._warm[1:]
        for worker in warm:
            if worker.is_alive():
                return worker  # even one still importing is ahead of a cold start
            log.warning("the warm worker died (exit code %s); starting a cold one", worker.stop())
        return spawn_worker(
            preload=False,
            log_path=self.log_path,
            held_fds=self.held_fds,
            temp_root=self.temp_root,
            on_ready=self._measured,
        )

    def refill(self, count: int = 1, *, shrink: bool = False) -> None:
        """Hold `count` warm workers: start the missing ones (with `shrink`, stop extra ones).

        The idle machine holds one. A search asks for two while more trials are
        to come: each worker then has a whole trial more to import TensorFlow,
        which a trial stopped after one epoch does not give one
        (benchmarks/sweep.py), and for one again as it ends.
        """
        with self._lock:
            if self._closed or not self.warm_enabled:
                return
            alive = [worker for worker in self._warm if worker.is_alive()]
            gone = [worker for worker in self._warm if not worker.is_alive()]
            if shrink:  # the newest go: the oldest are the likeliest to be ready
                gone += alive[count:]
                alive = alive[:count]
            self._warm = alive
            while len(self._warm) < count:
                self._warm.append(
                    spawn_worker(
                        preload=True,
                        log_path=self.log_path,
                        dataset=self.dataset,
                        held_fds=self.held_fds,
                        temp_root=self.temp_root,
                        on_ready=self._measured,
                    )
                )
        for worker in gone:
            worker.stop()

    def close(self) -> None:
        """Stop the warm workers, and start no other."""
        with self._lock:
            self._closed = True
            workers, self._warm = self._warm, []
        for worker in workers:
            worker.stop()
