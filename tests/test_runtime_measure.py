"""Admission counts the runtime a worker measured, not a constant: Ready carries it to the pool."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

import pytest

from naive_model.config import RUNTIME_FALLBACK_BYTES
from service.processes.warm_pool import WorkerPool
from service.processes.worker_process import WorkerProcess
from service.protocol import Ready, Running

MIB = 1024**2


def _fake_worker(on_ready, *, warm: bool = False) -> tuple[WorkerProcess, Connection]:
    """A WorkerProcess over a socket pair and a sleeping process; the other end plays the worker."""
    server_end, worker_end = socket.socketpair()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker = WorkerProcess(process, Connection(server_end.detach()), warm=warm, on_ready=on_ready)
    return worker, Connection(worker_end.detach())


def test_a_workers_ready_hands_its_runtime_to_the_pool_and_the_largest_counts():
    pool = WorkerPool(warm=False)
    assert pool.runtime_bytes == RUNTIME_FALLBACK_BYTES  # nothing measured yet
    worker, other_end = _fake_worker(pool._measured)
    try:
        other_end.send(Ready(resident_bytes=600 * MIB))
        other_end.send(Running(replicas=1))
        assert worker.receive(timeout=10) == Running(replicas=1)  # Ready is not the task's
        assert pool.runtime_bytes == 600 * MIB
        other_end.send(Ready(resident_bytes=500 * MIB))
        other_end.send(Running(replicas=1))
        worker.receive(timeout=10)
        assert pool.runtime_bytes == 600 * MIB  # the largest seen
    finally:
        worker.stop(grace=0.1)
        other_end.close()


def test_the_warm_workers_ready_is_measured_as_the_pool_polls_it():
    pool = WorkerPool(warm=True)
    worker, other_end = _fake_worker(pool._measured, warm=True)
    pool._warm = [worker]
    try:
        assert pool.warm_ready == 0
        other_end.send(Ready(resident_bytes=700 * MIB))
        deadline = time.monotonic() + 10
        while not pool.warm_ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.warm_ready == 1
        assert pool.runtime_bytes == 700 * MIB
    finally:
        pool.close()
        other_end.close()


@pytest.mark.slow
def test_a_warm_worker_measures_the_runtime_of_this_install():
    pool = WorkerPool(warm=True)
    try:
        pool.refill()
        deadline = time.monotonic() + 300
        while not pool.warm_ready and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pool.warm_ready
        measured = pool.runtime_bytes
        # TensorFlow imported: hundreds of MiB, whatever else this install holds.
        assert 200 * MIB < measured < RUNTIME_FALLBACK_BYTES
    finally:
        pool.close()


def test_the_pool_holds_as_many_warm_workers_as_asked_and_hands_out_the_oldest(monkeypatch):
    import service.processes.warm_pool as warm_pool

    started: list[tuple[WorkerProcess, Connection]] = []

    def spawn(**options):
        started.append(_fake_worker(options["on_ready"], warm=True))
        return started[-1][0]

    monkeypatch.setattr(warm_pool, "spawn_worker", spawn)
    pool = WorkerPool(warm=True)
    try:
        pool.refill()  # the idle host's one
        pool.refill(2, shrink=True)  # a search's two
        assert len(started) == 2
        first, second = (worker for worker, _ in started)
        assert pool.take() is first
        pool.refill()  # idle: at least one, and the one there is kept
        assert len(started) == 2
        pool.refill(2, shrink=True)
        third = started[-1][0]
        assert len(started) == 3
        pool.refill(1, shrink=True)  # the search ended: the newest goes
        assert not third.is_alive() and second.is_alive()
        assert pool.take() is second
    finally:
        pool.close()
        for worker, other_end in started:
            worker.stop(grace=0.1)
            other_end.close()
