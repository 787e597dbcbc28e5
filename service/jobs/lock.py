"""One server per state directory: an exclusive lock held for the server's life.

Two servers on one directory would each think the other's running jobs were
interrupted and run the queued ones twice. `flock` on `state-dir/server.lock`
is released by the kernel when the last process holding it ends, however it
ends (kill -9 too), so a stale lock never blocks a restart for long. The
server's workers inherit the lock's descriptor: after a kill -9 of the
server, its orphaned workers (which end within a second or two, when they see
their parent gone) still hold it, so a new server waits for them rather than
resuming a job whose old worker may still be writing its checkpoint. The
file names the holder.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

# How long a new server waits for the orphaned workers of a dead one.
ORPHAN_WAIT_SECONDS = 20.0


class StateDirInUse(RuntimeError):
    """Another live server holds the state directory."""


class StateDirLock:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "server.lock"
        self.fd: int | None = None

    def acquire(self, orphan_wait: float = ORPHAN_WAIT_SECONDS) -> None:
        """Take the lock, or raise StateDirInUse naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + orphan_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                if _holder_alive(holder) or time.monotonic() > deadline:
                    os.close(fd)
                    raise StateDirInUse(
                        f"{self.path.parent} is in use by another ntrain server "
                        f"({holder or 'unknown holder'})"
                    ) from None
                time.sleep(0.1)  # the server is gone: its workers are ending
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the kernel drops the lock once workers let go too
            self.fd = None


def _holder_alive(holder: str) -> bool:
    """Whether the server the lock file names still runs (on this host)."""
    parts = holder.split()
    if len(parts) < 4 or parts[0] != "pid" or parts[3] != socket.gethostname():
        return True  # not ours to judge: treat it as live
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True
