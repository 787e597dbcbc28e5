"""A server leaves nothing in the system's temporary directory.

`ntrain serve` runs in a child process whose TMPDIR is a fresh folder; it
trains a job, answers Evaluate and Predict, and stops on SIGTERM. Its workers
wrote TensorFlow's temporary files (autograph's generated modules) in their
own folders there, and the folder is empty once the server has stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from ntrain.v1 import training_pb2 as pb
from service_harness import job_spec

from ntrain.client import Client

pytestmark = pytest.mark.slow


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_server_that_trained_evaluated_and_predicted_leaves_no_temporary_file(tmp_path):
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    state_dir, port_file = tmp_path / "state", tmp_path / "port"
    command = [
        sys.executable, "-m", "service.cli", "serve", "--port", "0", "--no-metrics",
        "--state-dir", str(state_dir), "--port-file", str(port_file),
    ]  # fmt: skip
    env = dict(os.environ, TMPDIR=str(temp_dir))
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
        )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not start in 120 s"
            time.sleep(0.05)
        with Client(f"127.0.0.1:{int(port_file.read_text())}") as client:
            job = client.submit(job_spec())
            assert client.wait(job.job_id).state == pb.JOB_STATE_SUCCEEDED
            assert client.evaluate(job.job_id).examples > 0
            pixels = np.zeros((3, 784), dtype=np.uint8)
            assert client.predict(job.job_id, pixels).shape == (3, 10)
            # The workers' folders are there, with what TensorFlow wrote in them.
            during = files_under(temp_dir)
            assert any(name.startswith("ntrain-worker-") for name in during), during
            assert any("__autograph_generated_file" in name for name in during), during
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    assert server.returncode == 0, (tmp_path / "serve.log").read_text()
    assert files_under(temp_dir) == []
