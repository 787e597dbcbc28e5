"""A hung worker (SIGSTOP) is noticed by its silence, killed, and its job restarted."""

from __future__ import annotations

import os
import signal
import time

import pytest
from ntrain.v1 import training_pb2 as pb
from service_harness import RunningServer, child_worker_pids, job_spec, process_exists

pytestmark = pytest.mark.slow

HANG_SECONDS = 6.0


def test_a_stopped_worker_is_killed_as_hung_and_the_job_resumes(tmp_path):
    server = RunningServer(tmp_path / "state", hang_seconds=HANG_SECONDS, warm_worker=False)
    try:
        job = server.submit(job_spec(epochs=100_000, steps_per_execution=2, max_restarts=1))
        deadline = time.monotonic() + 300
        while server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).progress.step < 20:
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.05)
        (pid,) = child_worker_pids()
        assert not server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).restarts
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        hung = None
        while hung is None:
            assert time.monotonic() - stopped < HANG_SECONDS + 60, "the hang was not noticed"
            record = server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
            hung = next((t for t in record.transitions if "it hung" in t.reason), None)
            time.sleep(0.05)
        detected = time.monotonic() - stopped
        print(f"\na worker stopped with SIGSTOP was taken for hung after {detected:.1f} s")
        assert HANG_SECONDS <= detected
        assert hung.state == pb.JOB_STATE_QUEUED and "restart 1 of 1" in hung.reason
        assert not process_exists(pid) or _is_zombie(pid)  # killed, not left stopped

        running = server.wait_for(job.job_id, states=(pb.JOB_STATE_RUNNING,), timeout=300)
        assert running.restarts == 1
        server.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=60)
    finally:
        server.stop()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
