"""A worker process seen from the server: start it, talk to it, end it.

A worker is a fresh interpreter, `python -m service.worker.entry`, never a
fork (the server has threads, and a forked TensorFlow is not safe), and not
multiprocessing's "spawn" either: that re-imports the parent's main module in
the child, which would bring the CLI, and with it gRPC, into every worker.
The two ends talk over a socket pair wrapped in multiprocessing's
`Connection`, which sends the protocol's dataclasses pickled. A crash or an
out-of-memory kill takes only that worker down, and its GPU memory is freed
when it ends.

Each worker has its own temporary folder (its TMPDIR), removed when the
server reaps it: TensorFlow writes files there that a killed process never
removes (autograph's `__autograph_generated_file*.py`, one per traced
function, are deleted only by an atexit hook that SIGTERM and SIGKILL skip).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from service.protocol import Ready, ServerMessage, WorkerEvent

STOP_GRACE_SECONDS = 5.0


class WorkerProcess:
    """One worker, the server's end of its pipe, and the worker's temporary folder.

    Args:
        on_ready: called with the runtime's resident bytes from the worker's
            `Ready` (a warm one's at start, a cold one's before its task).
    """

    def __init__(
        self,
        process: subprocess.Popen,
        conn: Connection,
        warm: bool,
        temp_dir: Path | None = None,
        on_ready: Callable[[int], None] | None = None,
    ):
        self.process = process
        self.conn = conn
        self.warm = warm
        self.temp_dir = temp_dir
        self.on_ready = on_ready
        self._ready = not warm

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.poll() is None

    @property
    def ready(self) -> bool:
        """Whether a warm worker has finished importing TensorFlow."""
        try:
            if not self._ready and self.is_alive() and self.conn.poll(0):
                event = self.conn.recv()
                if isinstance(event, Ready):
                    self._saw_ready(event)
        except (EOFError, OSError):  # it died as it started: not ready, and never will be
            return False
        return self._ready

    def send(self, message: ServerMessage) -> None:
        self.conn.send(message)

    def receive(self, timeout: float | None = None) -> WorkerEvent | None:
        """The worker's next event; None after `timeout` seconds without one.

        Raises:
            EOFError: the worker is gone (it ended, crashed or was killed).
        """
        while True:
            if timeout is not None and not self.conn.poll(timeout):
                return None
            event = self.conn.recv()
            if isinstance(event, Ready):  # the runtime's measurement; the task's events follow
                self._saw_ready(event)
                continue
            return event

    def _saw_ready(self, ready: Ready) -> None:
        self._ready = True
        if self.on_ready is not None:
            self.on_ready(ready.resident_bytes)

    def kill(self) -> None:
        """SIGKILL, at once: the thread reading its pipe then sees EOF."""
        if self.is_alive():
            self.process.kill()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """End the process (SIGTERM, then SIGKILL after `grace`), reap it, remove its temp folder.

        Returns:
            Its exit code: negative for the signal that ended it.
        """
        if self.is_alive():
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.conn.close()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)  # nothing in it outlives the process
        return self.process.returncode

    def wait(self, timeout: float) -> int | None:
        """Let a worker that sent its last message exit by itself, then reap it."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.stop()


def spawn_worker(
    *,
    preload: bool,
    log_path: Path | None = None,
    dataset: tuple[str, Path | None] | None = None,
    held_fds: tuple[int, ...] = (),
    model_cache: int = 0,
    cache_bytes: int = 0,
    temp_root: Path | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> WorkerProcess:
    """Start a worker process; with `preload` it imports TensorFlow right away.

    Args:
        log_path: the file for the worker's output until its task names one.
        dataset: (name, data_dir) of a data set a warm worker loads while it waits.
        held_fds: descriptors the worker inherits and keeps open until it ends
            (the state directory's lock).
        model_cache: when positive, the process is the inference worker and
            keeps this many models loaded (service.worker.serving), and their
            weights and its test splits within `cache_bytes`.
        temp_root: where the worker's temporary folder is made (the system's
            temporary directory when None); `WorkerProcess.stop` removes it.
        on_ready: called with the runtime's resident bytes the worker
            reports once it has imported TensorFlow.
    """
    if temp_root is not None:
        temp_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="ntrain-worker-", dir=temp_root))
    server_end, worker_end = socket.socketpair()
    command = [sys.executable, "-m", "service.worker.entry", "--fd", str(worker_end.fileno())]
    if preload:
        command.append("--preload")
    if log_path is not None:
        command += ["--log", str(log_path)]
    if dataset is not None:
        name, data_dir = dataset
        command += ["--dataset", name]
        if data_dir is not None:
            command += ["--data-dir", str(data_dir)]
    if model_cache:
        command += ["--model-cache", str(model_cache), "--cache-bytes", str(cache_bytes)]
    # The worker finds this package as the server does, installed or not.
    path = [_source_root(), os.environ.get("PYTHONPATH", "")]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(part for part in path if part), TMPDIR=str(temp_dir)
    )
    try:
        process = subprocess.Popen(
            command,
            pass_fds=(worker_end.fileno(), *held_fds),
            stdin=subprocess.DEVNULL,
            env=env,
            close_fds=True,
            umask=0o077,  # checkpoints, models and logs readable by the server's user only
        )
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        server_end.close()
        worker_end.close()
        raise
    worker_end.close()  # so that the server sees EOF when the worker ends
    return WorkerProcess(
        process,
        Connection(server_end.detach()),
        warm=preload,
        temp_dir=temp_dir,
        on_ready=on_ready,
    )


def _source_root() -> str:
    """The folder holding the `service` package this server runs from."""
    return str(Path(__file__).resolve().parents[2])
