"""Large Predict inputs through a shared-memory file: one copy, and no file left behind."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from service.processes import shared_inputs
from service.processes.shared_inputs import MIN_SHARED_BYTES, SharedInputs
from service.worker.shared_view import SharedView


def _files(directory) -> list[str]:
    return sorted(path.name for path in directory.glob("ntrain-inputs-*"))


def test_a_large_array_is_written_once_and_its_name_goes_after_the_answer(tmp_path):
    server, worker = SharedInputs(tmp_path), SharedView()
    x = np.random.default_rng(0).random((512, 784), dtype=np.float32)  # 1.6 MB
    shared = server.put(x)
    assert shared is not None and shared.shape == (512, 784) and shared.dtype == "float32"
    (name,) = _files(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600  # the server's alone
    np.testing.assert_array_equal(worker.array(shared), x)
    server.answered()  # the worker has it mapped: the name goes, the memory stays
    assert _files(tmp_path) == []
    pixels = np.full((1024, 784), 7, dtype=np.uint8)  # smaller: the same file again
    again = server.put(pixels)
    assert again is not None and again.path == shared.path and again.dtype == "uint8"
    np.testing.assert_array_equal(worker.array(again), pixels)
    bigger = np.ones((2048, 784), dtype=np.float32)  # 6.4 MB: a new, larger file
    grown = server.put(bigger)
    assert grown is not None and grown.path != shared.path
    np.testing.assert_array_equal(worker.array(grown), bigger)
    server.close()
    worker.close()
    assert _files(tmp_path) == []


def test_small_arrays_and_a_full_tmpfs_go_through_the_socket(tmp_path, monkeypatch):
    server = SharedInputs(tmp_path)
    assert server.put(np.zeros(MIN_SHARED_BYTES // 4 - 1, dtype=np.float32)) is None

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shared_inputs.os, "posix_fallocate", full)
    assert server.put(np.zeros((1024, 784), dtype=np.float32)) is None
    assert _files(tmp_path) == []  # nothing half made


def test_no_shared_memory_directory_or_a_strided_array_means_the_socket(tmp_path):
    assert SharedInputs(tmp_path / "none").put(np.zeros((1024, 784), np.float32)) is None
    every_other_row = np.zeros((2048, 784), np.float32)[::2]
    assert SharedInputs(tmp_path).put(every_other_row) is None


@pytest.mark.skipif(not shared_inputs.SHM_DIR.is_dir(), reason="no /dev/shm")
def test_the_default_directory_is_the_hosts_shared_memory():
    server = SharedInputs()
    shared = server.put(np.ones((256, 784), dtype=np.float32))
    try:
        assert shared is not None and shared.path.startswith("/dev/shm/ntrain-inputs-")
    finally:
        server.close()
    assert not os.path.exists(shared.path)


def test_a_killed_servers_file_is_removed_by_the_next_server_and_no_other(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its process id now names no process (nothing here starts another so fast)
    killed = tmp_path / f"ntrain-inputs-{gone.pid}-{'a' * 32}"
    live = tmp_path / f"ntrain-inputs-{os.getpid()}-{'b' * 32}"
    other = tmp_path / f"ntrain-inputs-{'c' * 32}"  # no process id: not one of these
    for path in (killed, live, other):
        path.write_bytes(b"x")
    SharedInputs(tmp_path)
    assert _files(tmp_path) == sorted([live.name, other.name])
