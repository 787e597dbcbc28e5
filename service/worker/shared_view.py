"""The inference worker's side of large Predict inputs: the server's shared file, mapped.

The server writes a large input once into a file in /dev/shm and names it in
the task (`service.protocol.SharedArray`; the server's side is
`service.processes.shared_inputs`). The mapping is kept from task to task
while the server names the same file: the server removes the name after the
first answer, and only this mapping keeps the memory.
"""

from __future__ import annotations

import mmap

import numpy as np

from service.protocol import SharedArray


class SharedView:
    """The worker's side: the server's shared file mapped, kept while the server uses it."""

    def __init__(self) -> None:
        self._path = ""
        self._map: mmap.mmap | None = None

    def array(self, shared: SharedArray) -> np.ndarray:
        """The array `shared` names, a view on the mapping (valid until the next task)."""
        if shared.path != self._path or self._map is None:
            self.close()
            with open(shared.path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            self._path = shared.path
        return np.ndarray(shared.shape, dtype=np.dtype(shared.dtype), buffer=self._map)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view of the last task is still alive: it goes with it
                pass
        self._map, self._path = None, ""
