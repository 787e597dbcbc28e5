"""The server's side of multi_worker jobs, against a fake Ray Jobs on 127.0.0.1.

The spec-to-Ray mapping, the REST client (submit, status, logs, stop, errors,
the bearer token), the driver's event lines, validation, and `RayRunner`
following a job to each of its ends.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from pathlib import Path

import pytest
from ray_fake import FakeJob, FakeRayJobs

from naive_model.config import LayerSpec, TrainConfig
from service.jobs.errors import FailedPrecondition, InvalidArgument
from service.jobs.ray_jobs import (
    RayJobNotFound,
    RayJobsClient,
    RayJobsError,
    submission_request,
)
from service.jobs.ray_runner import RayRunner
from service.jobs.runner import CANCEL, RunEnd, Stop
from service.jobs.scheduler import Demand, Scheduler, demand_for
from service.jobs.validation import validate_job_spec
from service.protocol import (
    RAY_TASK_ENV,
    CheckpointSaved,
    EpochEnd,
    Failed,
    JobSpec,
    Progress,
    RayTrainTask,
    Resumed,
    Running,
    TrainingResult,
    event_line,
    parse_event_lines,
)

SPEC = JobSpec(
    train=TrainConfig(
        layers=(LayerSpec(units=16), LayerSpec(units=10, activation="softmax")),
        batch_size=64,
        epochs=2,
    ),
    dataset="synthetic",
    strategy="multi_worker",
    hosts=2,
    gpus_per_host=0,
    max_restarts=1,
)
TASK = RayTrainTask(
    job_id="job-0123456789ab",
    job_dir=Path("/shared/var/jobs/job-0123456789ab"),
    spec=SPEC,
    hosts=2,
    gpus_per_host=0,
    data_dir=Path("/shared/data"),
    storage_path=Path("/shared/var/jobs/job-0123456789ab/ray"),
    data_budget_bytes=64 * 2**20,
)


def progress(epoch: int, step: int) -> Progress:
    return Progress(
        epoch=epoch,
        epochs=2,
        step=step,
        steps_per_epoch=32,
        step_in_epoch=step - 32 * (epoch - 1),
        loss=1.5,
        accuracy=0.5,
        examples_per_second=1000.0,
        examples=64 * step,
        call_steps=1,
        call_examples=64,
        call_seconds=0.064,
    )


def epoch_end(epoch: int) -> EpochEnd:
    return EpochEnd(
        epoch=epoch,
        train_loss=1.0,
        train_accuracy=0.6,
        eval_loss=None,
        eval_accuracy=None,
        seconds=1.0,
    )


RESULT = TrainingResult(
    train_loss=0.5,
    train_accuracy=0.9,
    test_loss=0.6,
    test_accuracy=0.85,
    steps=64,
    train_seconds=2.0,
    examples_per_second=2000.0,
    has_model=True,
)


@pytest.fixture
def ray():
    fake = FakeRayJobs()
    yield fake
    fake.close()


# -- the mapping and the client ------------------------------------------------------


def test_a_task_maps_to_a_ray_job_named_after_the_ntrain_job():
    request = submission_request(TASK)
    assert request["submission_id"] == "job-0123456789ab"
    assert request["entrypoint"] == "python -m service.driver"
    env = request["runtime_env"]["env_vars"]
    assert RayTrainTask.from_json(env[RAY_TASK_ENV]) == TASK
    assert all(isinstance(value, str) for value in env.values())  # Ray's env_vars are strings
    assert request["metadata"] == {
        "ntrain_job_id": "job-0123456789ab",
        "hosts": "2",
        "gpus_per_host": "0",
    }
    json.dumps(request)  # it is what goes over the wire


def test_client_submits_reads_and_stops_with_its_token(ray):
    ray.token = "s3cret"
    client = RayJobsClient(ray.address, token="s3cret")
    client.submit(TASK)
    assert ray.requests[-1].method == "POST" and ray.requests[-1].path == "/api/jobs/"
    assert ray.requests[-1].body == submission_request(TASK)
    assert ray.requests[-1].headers["Authorization"] == "Bearer s3cret"
    assert client.status(TASK.job_id).status == "RUNNING"
    ray.print(TASK.job_id, "hello\n")
    assert client.logs(TASK.job_id) == "hello\n"
    assert client.stop(TASK.job_id) is True
    status = client.status(TASK.job_id)
    assert status.finished and status.status == "STOPPED"
    assert client.stop(TASK.job_id) is False  # ended already


def test_client_errors_name_what_failed(ray, tmp_path):
    client = RayJobsClient(ray.address)
    with pytest.raises(RayJobNotFound, match="HTTP 404"):
        client.status("job-nope")
    ray.token = "right"
    with pytest.raises(RayJobsError, match="HTTP 401") as error:
        RayJobsClient(ray.address, token="wrong").status("job-nope")
    assert error.value.status == 401 and "wrong" not in str(error.value)
    ray.token = None
    ray.fail_with = 500
    with pytest.raises(RayJobsError, match="HTTP 500: something broke"):
        client.logs("job-x")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(RayJobsError, match="cannot reach Ray Jobs"):
        RayJobsClient(f"http://127.0.0.1:{closed}", timeout=2).status("job-x")
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        RayJobsClient("127.0.0.1:8265")
    token_file = tmp_path / "ray.token"
    token_file.write_text("from-file\n")
    assert RayJobsClient.from_token_file(ray.address, token_file)._token == "from-file"


# -- the driver's event lines ---------------------------------------------------------


def test_event_lines_round_trip_among_other_output():
    events = [
        Running(replicas=2),
        Resumed(path="/x/ckpt-32", epoch=1, step=32),
        progress(1, 1),
        epoch_end(1),
        CheckpointSaved(path="/x/ckpt-32", epoch=1, step=32, seconds=0.1),
        RESULT,
        Failed(reason="diverged: loss is nan"),
    ]
    text = "".join(
        f"(RayTrainWorker pid=7, ip=127.0.0.2) noise\n{event_line(n, e)}\n"
        for n, e in enumerate(events, 1)
    )
    text += "NTRAIN-EVENT 8 {not json}\n" + event_line(9, RESULT)  # cut: no newline yet
    assert parse_event_lines(text) == list(enumerate(events, 1))
    nan = parse_event_lines(event_line(1, epoch_end(1)).replace("1.0", "NaN", 1) + "\n")
    assert math.isnan(nan[0][1].train_loss)


# -- validation -----------------------------------------------------------------------


def test_multi_worker_needs_the_ray_address_flag():
    with pytest.raises(FailedPrecondition, match="--ray-address"):
        validate_job_spec(SPEC, data_dir=None, host_gpus=0)
    demand, _ = validate_job_spec(SPEC, data_dir=None, host_gpus=0, ray_enabled=True)
    assert demand == Demand(strategy="multi_worker", replicas=2, remote=True)


@pytest.mark.parametrize(
    ("hosts", "gpus", "device_count", "words"),
    [
        (0, 0, 0, "strategy.hosts"),
        (2, -1, 0, "strategy.gpus_per_host"),
        (2, 17, 0, "strategy.gpus_per_host"),
        (2, 0, 2, "strategy.device_count"),
    ],
)
def test_multi_worker_fields_are_checked(hosts, gpus, device_count, words):
    with pytest.raises(InvalidArgument, match=words):
        demand_for("multi_worker", device_count, 0, hosts=hosts, gpus_per_host=gpus)


def test_global_batch_must_divide_over_every_replica_of_every_host():
    spec = JobSpec(**{**SPEC.__dict__, "hosts": 3, "gpus_per_host": 4})  # 12 replicas
    with pytest.raises(InvalidArgument, match="divisible by the replica count 12"):
        validate_job_spec(spec, data_dir=None, host_gpus=0, ray_enabled=True)
    with pytest.raises(InvalidArgument, match="for multi_worker only"):
        demand_for("cpu", 0, 0, hosts=2)


def test_a_ray_job_takes_no_cpu_slot_of_the_server_host():
    scheduler = Scheduler([], max_cpu_jobs=1)
    scheduler.enqueue("job-cpu", demand_for("cpu", 0, 0))
    scheduler.enqueue("job-ray", demand_for("multi_worker", 0, 0, hosts=2))
    scheduler.enqueue("job-cpu2", demand_for("cpu", 0, 0))
    assert [a.job_id for a in scheduler.next_runnable()] == ["job-cpu", "job-ray"]


# -- following a Ray job ---------------------------------------------------------------


class Followed:
    """A RayRunner's callbacks, recorded."""

    def __init__(self):
        self.events = []
        self.outcome = None
        self.done = threading.Event()

    def on_end(self, outcome):
        self.outcome = outcome
        self.done.set()

    def runner(self, ray, **options) -> RayRunner:
        return RayRunner(
            TASK,
            client=RayJobsClient(ray.address),
            on_event=self.events.append,
            on_end=self.on_end,
            poll_seconds=0.02,
            **options,
        )


def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_runner_submits_forwards_events_in_order_and_succeeds(ray):
    followed = Followed()
    runner = followed.runner(ray)
    runner.start()
    _wait_until(lambda: TASK.job_id in ray.jobs)
    ray.emit(TASK.job_id, Running(replicas=2), progress(1, 1))
    _wait_until(lambda: len(followed.events) == 2)
    ray.emit(TASK.job_id, epoch_end(1), progress(2, 33), epoch_end(2), RESULT)
    ray.finish(TASK.job_id, "SUCCEEDED")
    assert followed.done.wait(10)
    assert followed.outcome.end is RunEnd.SUCCEEDED
    assert followed.events == [
        Running(replicas=2),
        progress(1, 1),
        epoch_end(1),
        progress(2, 33),
        epoch_end(2),
        RESULT,
    ]
    assert sum(1 for r in ray.requests if r.method == "POST" and r.path == "/api/jobs/") == 1


def test_runner_reattaches_without_repeating_stored_events(ray):
    ray.jobs[TASK.job_id] = FakeJob(request=submission_request(TASK))
    ray.emit(
        TASK.job_id,
        Running(replicas=2),
        progress(1, 1),
        epoch_end(1),
        CheckpointSaved(path="/c", epoch=1, step=32, seconds=0.1),
        progress(2, 33),
    )
    followed = Followed()
    # The earlier server stored progress(1, 1) and epoch_end(1) before it stopped.
    runner = followed.runner(ray, stored_events=2)
    runner.start()
    _wait_until(lambda: len(followed.events) == 2)
    ray.emit(TASK.job_id, epoch_end(2), RESULT)
    ray.finish(TASK.job_id, "SUCCEEDED")
    assert followed.done.wait(10)
    assert followed.outcome.end is RunEnd.SUCCEEDED
    assert followed.events == [
        CheckpointSaved(path="/c", epoch=1, step=32, seconds=0.1),
        progress(2, 33),
        epoch_end(2),
        RESULT,
    ]
    assert not [r for r in ray.requests if r.method == "POST" and r.path == "/api/jobs/"]


def test_cancel_stops_the_ray_job(ray):
    followed = Followed()
    runner = followed.runner(ray)
    runner.start()
    _wait_until(lambda: TASK.job_id in ray.jobs)
    runner.stop(CANCEL)
    assert followed.done.wait(10)
    assert followed.outcome.end is RunEnd.CANCELED
    assert ray.jobs[TASK.job_id].stop_requests == 1


def test_a_stop_for_a_reason_stops_the_ray_job_and_fails_it(ray):
    followed = Followed()
    runner = followed.runner(ray)
    runner.start()
    _wait_until(lambda: TASK.job_id in ray.jobs)
    # The control loop's stop at a job's max_runtime_seconds (tests/test_controller.py).
    runner.stop(Stop(RunEnd.FAILED, "the job ran past its max_runtime_seconds of 0.2"))
    assert followed.done.wait(10)
    assert followed.outcome.end is RunEnd.FAILED
    assert "max_runtime_seconds of 0.2" in followed.outcome.reason
    assert ray.jobs[TASK.job_id].stop_requests == 1


def test_a_failed_ray_job_fails_with_the_drivers_reason(ray):
    followed = Followed()
    followed.runner(ray).start()
    _wait_until(lambda: TASK.job_id in ray.jobs)
    ray.emit(TASK.job_id, Failed(reason="the loss became nan in epoch 1"))
    ray.finish(TASK.job_id, "FAILED", "Job entrypoint command failed with exit code 1")
    assert followed.done.wait(10)
    assert followed.outcome.end is RunEnd.FAILED
    assert followed.outcome.reason == "the loss became nan in epoch 1"


def test_a_ray_job_that_dies_without_a_word_fails_with_rays_message(ray):
    followed = Followed()
    followed.runner(ray).start()
    _wait_until(lambda: TASK.job_id in ray.jobs)
    ray.finish(TASK.job_id, "FAILED", "Job entrypoint command failed\nModuleNotFoundError: ray")
    assert followed.done.wait(10)
    assert followed.outcome.reason == "the Ray job failed: ModuleNotFoundError: ray"


def test_server_shutdown_leaves_the_ray_job_running(ray):
    followed = Followed()
    runner = followed.runner(ray)
    runner.start()
    _wait_until(lambda: TASK.job_id in ray.jobs)
    runner.request_stop()
    assert followed.done.wait(10)
    assert followed.outcome.end is RunEnd.STOPPED
    assert ray.jobs[TASK.job_id].status == "RUNNING"
    assert ray.jobs[TASK.job_id].stop_requests == 0


def test_a_ray_job_gone_from_the_cluster_fails(ray):
    followed = Followed()
    followed.runner(ray).start()
    _wait_until(lambda: TASK.job_id in ray.jobs)
    with ray.lock:
        del ray.jobs[TASK.job_id]  # the cluster was replaced, say
    assert followed.done.wait(10)
    assert followed.outcome.end is RunEnd.FAILED and "gone" in followed.outcome.reason
