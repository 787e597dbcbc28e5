"""Large Predict inputs handed to the inference worker through shared memory, not its socket.

A 1,024-image float32 Predict is 3.2 MB. Pickled through the worker's socket
it is copied four times (pickle, send, receive, unpickle): 3.9 ms there and
back beside 6.6 ms for all of gRPC (a probe of both on this 2-core host).
Written once into a file in /dev/shm that the worker maps, it is copied once.

The file belongs to one worker process. Its space is reserved before it is
written (`posix_fallocate`: a tmpfs that is full, as Docker's 64 MB /dev/shm
can be, refuses here instead of killing the server with SIGBUS on a write),
and its name is removed as soon as the worker has answered a task that named
it: the worker keeps its mapping, so a server killed later leaves nothing
behind. A server killed between the write and the answer leaves its file; the
name holds the server's process id, and the next server to start removes the
files of processes that are gone. When anything fails, the inputs go through
the socket as before.
"""

from __future__ import annotations

import logging
import mmap
import os
import uuid
from pathlib import Path
from typing import Any

from service.protocol import SharedArray

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# Below this, pickling through the socket costs less than a shared file's set-up.
MIN_SHARED_BYTES = 256 * 2**10
PREFIX = "ntrain-inputs-"  # then the server's process id, "-", and a random name


def remove_orphans(directory: Path = SHM_DIR) -> list[Path]:
    """Remove the shared files of server processes that no longer run; those removed."""
    removed = []
    for path in directory.glob(f"{PREFIX}*-*"):
        pid = path.name.removeprefix(PREFIX).partition("-")[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d shared input file(s) of servers that were killed", len(removed))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class SharedInputs:
    """The server's side: one shared file per worker process, grown when an input needs more.

    Not thread-safe: the inference worker's task lock serialises every use.
    """

    def __init__(self, directory: Path = SHM_DIR):
        self.directory = directory
        remove_orphans(directory)
        self._path: Path | None = None
        self._map: mmap.mmap | None = None
        self._named = False  # the file still has its name: the worker has not answered yet

    def put(self, array: Any) -> SharedArray | None:
        """Write `array` (a C-ordered numpy array) to the shared file; None: use the socket.

        The bytes are copied through the buffer protocol: this stage of the
        server imports no numpy.
        """
        if array.nbytes < MIN_SHARED_BYTES or not self.directory.is_dir():
            return None
        try:
            data = memoryview(array).cast("B")  # TypeError unless C-contiguous
        except TypeError:
            return None
        try:
            if self._map is None or len(self._map) < len(data):
                self.close()
                self._create(len(data))
            assert self._map is not None and self._path is not None
            self._map[: len(data)] = data  # the one copy
        except OSError as error:  # no room in /dev/shm, or none at all
            log.info("Predict inputs go through the worker's socket: %s", error)
            self.close()
            return None
        finally:
            data.release()
        return SharedArray(path=str(self._path), shape=tuple(array.shape), dtype=array.dtype.name)

    def answered(self) -> None:
        """The worker answered a task naming the file: it has it mapped, so the name can go."""
        if self._named and self._path is not None:
            self._path.unlink(missing_ok=True)
            self._named = False

    def close(self) -> None:
        """Let the file go (its worker ended, or a larger one is needed)."""
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._named and self._path is not None:
            self._path.unlink(missing_ok=True)
        self._path, self._named = None, False

    def _create(self, size: int) -> None:
        size = 1 << (size - 1).bit_length()  # powers of two: few regrowths
        path = self.directory / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._path, self._named = path, True
        try:
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
