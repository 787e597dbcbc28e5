"""One server per state directory: an exclusive lock held for the server's life.

Two servers on one directory would each think the other's running jobs were
interrupted and run the queued ones twice. `flock` on `state-dir/server.lock`
is released by the kernel when the process ends, however it ends (kill -9
too), so a stale lock never blocks a restart. The file names the holder.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class StateDirInUse(RuntimeError):
    """Another live server holds the state directory."""


class StateDirLock:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "server.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StateDirInUse naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StateDirInUse(
                f"{self.path.parent} is in use by another ntrain server ({holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
