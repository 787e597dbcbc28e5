"""A server leaves nothing in the system's temporary directory.

`ntrain serve` runs in a child process whose TMPDIR is a fresh folder; it
trains a job, answers Evaluate and Predict, and stops on SIGTERM. Its workers
write TensorFlow's temporary files (autograph's generated modules) in folders
of their own under the state directory, never in TMPDIR, and those folders
are gone once the server has stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from ntrain.v1 import training_pb2 as pb
from service_harness import job_spec

from ntrain.client import Client
from service.cli.local_server import LocalServer

pytestmark = pytest.mark.slow


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_server_that_trained_evaluated_and_predicted_leaves_no_temporary_file(tmp_path):
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    state_dir = tmp_path / "state"
    env = dict(os.environ, TMPDIR=str(temp_dir))
    server = LocalServer(state_dir, ["--no-metrics"], env=env)
    try:
        with Client(server.address) as client:
            job = client.submit(job_spec())
            assert client.wait(job.job_id).state == pb.JOB_STATE_SUCCEEDED
            assert client.evaluate(job.job_id).examples > 0
            pixels = np.zeros((3, 784), dtype=np.uint8)
            assert client.predict(job.job_id, pixels).shape == (3, 10)
            # The workers' folders are in the state directory, with what TensorFlow wrote.
            during = files_under(state_dir / "tmp")
            assert any(name.startswith("ntrain-worker-") for name in during), during
            assert any("__autograph_generated_file" in name for name in during), during
            assert files_under(temp_dir) == []
    finally:
        status = server.stop()
    assert status == 0, server.log_tail()
    assert files_under(temp_dir) == []
    assert files_under(state_dir / "tmp") == []
