"""Preemption on the CPU with real workers: the victim stops at a step boundary and loses nothing.

A long low-priority job holds the server's one CPU slot; a high-priority job
comes; the low one checkpoints at its next compiled call's end, waits while
the high one runs to its end, resumes from that checkpoint, and ends with
exactly the weights of the same job run alone. (Every victim rule is tested
against fakes in tests/test_controller.py.)
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from ntrain.v1 import training_pb2 as pb
from service_harness import RunningServer, job_spec

pytestmark = pytest.mark.slow

LOW, HIGH = -100, 100
# 2048 synthetic examples, batch 128: 16 steps an epoch, 2 steps a compiled call.
VICTIM = job_spec(epochs=4, steps_per_execution=2, priority=LOW, seed=7)


@pytest.fixture
def server(tmp_path):
    running = RunningServer(tmp_path / "state", max_cpu_jobs=1)
    yield running
    running.stop()


def _final_checkpoint(server: RunningServer, job_id: str) -> dict[str, np.ndarray]:
    """Every variable of the job's last checkpoint but the count of saves."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(server.manager.store.job_files(job_id).checkpoints))
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if not name.startswith(("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH"))
    }


def _progressed(server: RunningServer, job_id: str, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = server.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
        if job.progress.step >= step:
            return
        assert job.state not in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED), job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach step {step} in {timeout} s")


def test_an_urgent_job_preempts_a_running_one_which_resumes_and_ends_bitwise_equal(server):
    victim = server.submit(VICTIM)
    _progressed(server, victim.job_id, 5)
    urgent = server.submit(job_spec(epochs=1, priority=HIGH))

    done = server.wait_for(urgent.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    resumed = server.wait_for(victim.job_id)
    assert resumed.state == pb.JOB_STATE_SUCCEEDED, resumed.failure_reason
    assert resumed.preemptions == 1 and resumed.restarts == 0

    (preempted,) = [t for t in resumed.transitions if "preempted by" in t.reason]
    assert preempted.state == pb.JOB_STATE_QUEUED
    assert f"preempted by {urgent.job_id} (preemption 1)" in preempted.reason
    assert "resumes from epoch" in preempted.reason and "step" in preempted.reason
    # The urgent job started only once the victim had stopped, and ended before it resumed.
    urgent_start = [t.time.ToDatetime() for t in done.transitions][1]
    assert preempted.time.ToDatetime() <= urgent_start
    resumed_start = [
        t.time.ToDatetime() for t in resumed.transitions if t.state == pb.JOB_STATE_STARTING
    ][-1]
    assert resumed_start >= done.transitions[-1].time.ToDatetime()

    alone = server.submit(VICTIM, request_id="the same job, alone")
    alone = server.wait_for(alone.job_id)
    assert alone.state == pb.JOB_STATE_SUCCEEDED and alone.preemptions == 0
    assert resumed.result.steps == alone.result.steps == 4 * 16
    paused, straight = (
        _final_checkpoint(server, victim.job_id),
        _final_checkpoint(server, alone.job_id),
    )
    assert paused.keys() == straight.keys() and len(paused) > 4
    for name, value in straight.items():
        np.testing.assert_array_equal(paused[name], value, err_msg=name)
    assert resumed.result.test_accuracy == alone.result.test_accuracy
    # The victim's own log says why it stopped.
    log = server.manager.store.job_files(victim.job_id).train_log.read_text()
    assert f"as asked (preempted by {urgent.job_id}), after saving a checkpoint" in log
