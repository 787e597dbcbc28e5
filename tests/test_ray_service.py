"""Multi_worker jobs through a real server and client, with a fake Ray Jobs as the cluster.

The fake (tests/ray_fake.py) plays the driver's part: the test prints its
event lines. What a client sees (WatchJob, GetJob, CancelJob) must be what a
local job shows, and a server restart must reattach without a lost or
repeated event.
"""

from __future__ import annotations

import time

import grpc
import pytest
from ntrain.v1 import training_pb2 as pb
from ray_fake import FakeRayJobs
from service_harness import RunningServer, job_spec
from test_ray_jobs import RESULT, epoch_end, progress

from service.protocol import CheckpointSaved, RayTrainTask, Running

pytestmark = pytest.mark.slow

MULTI_WORKER = pb.StrategySpec(name="multi_worker", hosts=2)


@pytest.fixture
def ray():
    fake = FakeRayJobs()
    yield fake
    fake.close()


@pytest.fixture
def server(tmp_path, ray):
    running = RunningServer(tmp_path / "state", warm_worker=False, ray_address=ray.address)
    yield running
    running.stop()


def _submitted(ray: FakeRayJobs, job_id: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while job_id not in ray.jobs:
        assert time.monotonic() < deadline, f"{job_id} never reached Ray"
        time.sleep(0.01)
    return ray.jobs[job_id]


def _wait_for_sequence(server, job_id: str, sequence: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server.manager.get(job_id).last_sequence < sequence:
        assert time.monotonic() < deadline, "events did not arrive"
        time.sleep(0.01)


def test_without_ray_a_multi_worker_job_is_refused_naming_the_flag(tmp_path):
    running = RunningServer(tmp_path / "state", warm_worker=False)
    try:
        with pytest.raises(grpc.RpcError) as error:
            running.submit(job_spec(strategy=MULTI_WORKER))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--ray-address" in error.value.details()
        info = running.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert "multi_worker" not in info.strategies
    finally:
        running.stop()


def test_a_ray_job_reports_like_a_local_one(server, ray):
    job = server.submit(job_spec(strategy=MULTI_WORKER, epochs=2, batch_size=64))
    assert job.state == pb.JOB_STATE_STARTING
    submitted = _submitted(ray, job.job_id)
    task = RayTrainTask.from_json(submitted.request["runtime_env"]["env_vars"]["NTRAIN_RAY_TASK"])
    assert task.hosts == 2 and task.spec.strategy == "multi_worker"
    assert task.job_dir == (server.config.state_dir / "jobs" / job.job_id).resolve()
    ray.emit(job.job_id, Running(replicas=2), progress(1, 1))
    server.wait_for(job.job_id, [pb.JOB_STATE_RUNNING], timeout=10)
    ray.emit(
        job.job_id,
        epoch_end(1),
        CheckpointSaved(
            path=str(task.job_dir / "checkpoints" / "ckpt-32"), epoch=1, step=32, seconds=0.1
        ),
        progress(2, 33),
        epoch_end(2),
        RESULT,
    )
    ray.finish(job.job_id, "SUCCEEDED")
    events = server.events(job.job_id, timeout=30)
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds == [
        *("state_change", "state_change", "state_change"),  # QUEUED, STARTING, RUNNING
        *("progress", "epoch_end", "progress", "epoch_end", "result", "state_change"),
    ]
    assert events[-1].state_change.state == pb.JOB_STATE_SUCCEEDED
    final = server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=10)
    assert final.state == pb.JOB_STATE_SUCCEEDED
    assert final.strategy == "multi_worker"
    assert final.result.test_accuracy == pytest.approx(RESULT.test_accuracy)
    assert "on Ray at" in final.transitions[1].reason
    # The same series as a local job's, labelled with its strategy.
    registry = server.server.metrics.registry
    labels = {"job_id": job.job_id, "strategy": "multi_worker"}
    assert registry.get_sample_value("ntrain_train_batches_total", labels) == 2
    assert registry.get_sample_value("ntrain_train_epoch", labels) == 2
    assert registry.get_sample_value("ntrain_jobs_finished_total", {"outcome": "succeeded"}) == 1


def test_cancel_stops_the_ray_job(server, ray):
    job = server.submit(job_spec(strategy=MULTI_WORKER, batch_size=64))
    _submitted(ray, job.job_id)
    canceled = server.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=30)
    assert canceled.state == pb.JOB_STATE_CANCELED
    assert ray.jobs[job.job_id].stop_requests == 1


def test_a_restarted_server_reattaches_with_no_event_lost_or_repeated(server, ray):
    job = server.submit(job_spec(strategy=MULTI_WORKER, epochs=3, batch_size=64))
    _submitted(ray, job.job_id)
    ray.emit(job.job_id, Running(replicas=2), progress(1, 1), epoch_end(1))
    _wait_for_sequence(server, job.job_id, 5)  # QUEUED, STARTING, RUNNING, progress, epoch
    server.stop()
    # The Ray job goes on while no server follows it.
    ray.emit(job.job_id, progress(2, 33), epoch_end(2))
    server.start()
    ray.emit(job.job_id, progress(3, 65), epoch_end(3), RESULT)
    ray.finish(job.job_id, "SUCCEEDED")
    events = server.events(job.job_id, timeout=30)
    steps = [event.progress.step for event in events if event.WhichOneof("event") == "progress"]
    epochs = [event.epoch_end.epoch for event in events if event.WhichOneof("event") == "epoch_end"]
    assert steps == [1, 33, 65] and epochs == [1, 2, 3]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).state == pb.JOB_STATE_SUCCEEDED
    posts = [r for r in ray.requests if r.method == "POST" and r.path == "/api/jobs/"]
    assert len(posts) == 1  # reattached, not submitted again
    # The driver's log, copied into the job's train.log once, across the restart too:
    # `ntrain logs` reads a Ray job as it reads a local one.
    logs = server.stub.GetJobLogs(pb.GetJobLogsRequest(job_id=job.job_id), timeout=10)
    lines = [line for chunk in logs for line in chunk.lines]
    assert lines == ray.jobs[job.job_id].logs.splitlines()
    assert sum("NTRAIN-EVENT" in line for line in lines) == 8
