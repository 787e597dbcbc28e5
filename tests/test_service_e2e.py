"""End to end: a real server on port 0, a real client, real worker processes.

One MNIST epoch (from ../shared/data) must reach 95% on the test split; the
other jobs run on the small synthetic set to keep the suite short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
from ntrain.v1 import training_pb2 as pb
from service_harness import (
    TERMINAL,
    RunningServer,
    child_worker_pids,
    job_spec,
    process_exists,
)

from service.cli.specs import book_job_spec

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
PREDICTED = 1000  # test images sent to Predict: 1000 * 784 floats fit one 4 MB message


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, mnist_path):
    """MNIST (a link to ../shared/data/mnist.npz) and its first test images as a data set."""
    directory = tmp_path_factory.mktemp("data")
    (directory / "mnist.npz").symlink_to(mnist_path)
    with np.load(mnist_path) as mnist:
        x, y = mnist["x_test"][:PREDICTED], mnist["y_test"][:PREDICTED]
    np.savez(directory / "mnist_head.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    running = RunningServer(tmp_path_factory.mktemp("state"), data_dir=data_dir)
    yield running
    running.stop()


# The book's network (784 -> 512 relu -> 10 softmax, RMSprop 1e-3, batch 128) on CPU.
MNIST_SPEC = book_job_spec(pb.JobSpec(epochs=1, strategy=pb.StrategySpec(name="cpu"), seed=1))


@pytest.fixture(scope="module")
def mnist_job(server):
    """One MNIST epoch, submitted and watched to its end: (job, events)."""
    job = server.submit(MNIST_SPEC, request_id="mnist-e2e")
    events = server.events(job.job_id)
    return server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id)), events


def states_of(events):
    return [e.state_change.state for e in events if e.HasField("state_change")]


def test_mnist_job_succeeds_with_history_and_accuracy(mnist_job):
    job, events = mnist_job
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.failure_reason
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert states_of(events) == [
        pb.JOB_STATE_QUEUED,
        pb.JOB_STATE_STARTING,
        pb.JOB_STATE_RUNNING,
        pb.JOB_STATE_SUCCEEDED,
    ]
    times = [t.time.ToNanoseconds() for t in job.transitions]
    assert times == sorted(times) and len(times) == 4
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress and progress[-1].step == progress[-1].steps_per_epoch == 468
    assert progress[-1].examples == 468 * 128 and progress[-1].examples_per_second > 0
    (epoch_end,) = [e.epoch_end for e in events if e.HasField("epoch_end")]
    assert epoch_end.epoch == 1 and epoch_end.eval_accuracy >= 0.95
    assert events[-2].HasField("result") and events[-1].state_change.state == pb.JOB_STATE_SUCCEEDED
    assert job.result.has_model and job.result.test_accuracy >= 0.95
    assert job.strategy == "cpu" and list(job.devices) == ["CPU:0"]


def test_the_job_manager_reports_metrics(server, mnist_job):
    job, _ = mnist_job
    registry = server.server.metrics.registry
    labels = {"job_id": job.job_id, "strategy": "cpu"}
    assert registry.get_sample_value("ntrain_train_batches_total", labels) == 468
    assert registry.get_sample_value("ntrain_train_examples_total", labels) == 468 * 128
    assert registry.get_sample_value("ntrain_eval_accuracy_ratio", labels) >= 0.95
    assert registry.get_sample_value("ntrain_checkpoint_save_duration_seconds_count", labels) == 1
    assert registry.get_sample_value("ntrain_submit_to_first_step_seconds_count") >= 1
    finished = {"outcome": "succeeded"}
    assert registry.get_sample_value("ntrain_jobs_finished_total", finished) >= 1
    assert registry.get_sample_value("ntrain_devices", {"type": "CPU"}) == 1


def test_the_job_writes_tensorboard_events_of_its_progress(server, mnist_job):
    """In its job directory, on the global step axis: `tensorboard --logdir <state>/jobs`."""
    from test_naive_tensorboard import tensorboard_scalars

    from service.protocol import JobFiles

    job, events = mnist_job
    files = JobFiles(server.config.state_dir / "jobs" / job.job_id)
    scalars = tensorboard_scalars(files.tensorboard)
    progress = [e.progress for e in events if e.HasField("progress")]
    assert [step for step, _ in scalars["train/loss"]] == [p.step for p in progress]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(
        [p.loss for p in progress], rel=1e-6
    )
    assert [v for _, v in scalars["train/accuracy"]] == pytest.approx(
        [p.accuracy for p in progress], rel=1e-6
    )
    assert [step for step, _ in scalars["train/examples_per_second"]] == [p.step for p in progress]
    rates = [v for _, v in scalars["train/learning_rate"]]
    assert len(rates) == len(progress) and all(v == pytest.approx(0.001) for v in rates)
    (epoch_end,) = [e.epoch_end for e in events if e.HasField("epoch_end")]
    assert scalars["eval/accuracy"] == [(468, pytest.approx(epoch_end.eval_accuracy, rel=1e-6))]
    assert scalars["eval/loss"] == [(468, pytest.approx(epoch_end.eval_loss, rel=1e-6))]


def test_evaluate_and_predict_agree(server, mnist_job):
    job, _ = mnist_job
    evaluated = server.stub.Evaluate(pb.EvaluateRequest(job_id=job.job_id), timeout=120)
    assert evaluated.accuracy >= 0.95 and evaluated.examples == 10_000
    assert evaluated.accuracy == pytest.approx(job.result.test_accuracy, abs=1e-6)

    head = server.stub.Evaluate(
        pb.EvaluateRequest(job_id=job.job_id, dataset="mnist_head.npz"), timeout=120
    )
    with np.load(server.config.data_dir / "mnist_head.npz") as data:
        images = data["x_test"].reshape(PREDICTED, -1) / np.float32(255)
        labels = data["y_test"]
    predicted = server.stub.Predict(
        pb.PredictRequest(job_id=job.job_id, inputs=[pb.Example(values=row) for row in images]),
        timeout=120,
    ).predictions
    probabilities = np.array([p.probabilities for p in predicted])  # (1000, 10)
    predicted_labels = np.array([p.label for p in predicted])
    assert probabilities.shape == (PREDICTED, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    assert (predicted_labels == probabilities.argmax(axis=1)).all()
    assert np.mean(predicted_labels == labels) == pytest.approx(head.accuracy, abs=1e-9)
    loss = -np.mean(np.log(np.clip(probabilities[np.arange(PREDICTED), labels], 1e-7, 1)))
    assert loss == pytest.approx(head.loss, rel=1e-3)

    with pytest.raises(grpc.RpcError) as wrong_size:
        server.stub.Predict(
            pb.PredictRequest(job_id=job.job_id, inputs=[pb.Example(values=[0.5] * 10)])
        )
    assert wrong_size.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "784" in wrong_size.value.details()


def test_checkpoint_evaluation(server, mnist_job):
    job, _ = mnist_job
    answer = server.stub.Evaluate(
        pb.EvaluateRequest(job_id=job.job_id, use_checkpoint=True), timeout=120
    )
    assert answer.accuracy == pytest.approx(job.result.test_accuracy, abs=1e-6)
    assert "checkpoints" in answer.source


def test_idempotent_resubmission(server, mnist_job):
    job, _ = mnist_job
    jobs_before = server.stored_job_count()
    again = server.submit(MNIST_SPEC, request_id="mnist-e2e")
    assert again.job_id == job.job_id and again.state == pb.JOB_STATE_SUCCEEDED

    different = pb.JobSpec()
    different.CopyFrom(MNIST_SPEC)
    different.epochs = 2
    with pytest.raises(grpc.RpcError) as raised:
        server.submit(different, request_id="mnist-e2e")
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert job.job_id in raised.value.details()
    assert server.stored_job_count() == jobs_before


def test_watch_reconnects_without_gaps_or_repeats(server):
    job = server.submit(job_spec(epochs=6, steps_per_execution=4, dataset="synthetic"))
    stream = server.stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=120)
    seen = []
    for event in stream:
        seen.append(event)
        if event.HasField("progress"):
            break  # the job still runs: drop the connection mid-stream
    stream.cancel()
    while True:
        rest = server.events(job.job_id, after=seen[-1].sequence)
        seen.extend(rest)
        if (
            not rest
            or rest[-1].HasField("state_change")
            and rest[-1].state_change.state in TERMINAL
        ):
            break
    sequences = [e.sequence for e in seen]
    assert sequences == list(range(1, len(seen) + 1))
    assert seen[-1].state_change.state == pb.JOB_STATE_SUCCEEDED
    assert len([e for e in seen if e.HasField("epoch_end")]) == 6
    # A reconnect after the end replays exactly the tail asked for.
    tail = server.events(job.job_id, after=len(seen) - 3)
    assert [e.sequence for e in tail] == sequences[-3:]


def test_cancel_running_job_leaves_no_worker(server):
    job = server.submit(job_spec(epochs=100_000, dataset="synthetic"))
    for event in server.stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=120):
        if event.HasField("progress"):
            break
    # While a job runs no warm worker is started: the one worker is the job's.
    (worker_pid,) = child_worker_pids()

    canceled = server.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=60)

    assert canceled.state == pb.JOB_STATE_CANCELED
    assert not process_exists(worker_pid)
    assert [t.state for t in canceled.transitions][-2:] == [
        pb.JOB_STATE_CANCELLING,
        pb.JOB_STATE_CANCELED,
    ]
    info = server.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.running_jobs == 0 and not any(d.busy for d in info.devices)
    # A job that has ended cannot be canceled again, and stays as it was.
    with pytest.raises(grpc.RpcError) as again:
        server.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert again.value.details() == (
        f"job {job.job_id} already ended CANCELED; only a queued or running job can be canceled"
    )
    unchanged = server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    assert unchanged.transitions == canceled.transitions


def test_run_time_limit_and_worker_crash_fail_the_job(server):
    limited = server.submit(job_spec(epochs=100_000, max_runtime_seconds=1.0))
    job = server.wait_for(limited.job_id)
    assert job.state == pb.JOB_STATE_FAILED and "max_runtime_seconds" in job.failure_reason

    crashing = server.submit(job_spec(epochs=100_000, max_restarts=0))
    server.wait_for(crashing.job_id, [pb.JOB_STATE_RUNNING])
    (worker_pid,) = child_worker_pids()
    os.kill(worker_pid, signal.SIGKILL)
    job = server.wait_for(crashing.job_id)
    assert job.state == pb.JOB_STATE_FAILED and "SIGKILL" in job.failure_reason
    assert job.transitions[-1].reason == job.failure_reason and job.restarts == 0


def test_a_killed_worker_is_restarted_from_its_checkpoint(server):
    job = server.submit(job_spec(epochs=100_000, max_restarts=1))
    events = server.stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=300)
    for event in events:  # a checkpoint is saved at the end of every epoch
        if event.HasField("epoch_end") and event.epoch_end.epoch == 2:
            break
    (worker_pid,) = child_worker_pids()
    os.kill(worker_pid, signal.SIGKILL)
    for event in events:  # the stream goes on over the restart, with no gap
        if event.HasField("progress"):
            resumed = event.progress
            break
    # Not from the start: from the checkpoint of epoch 1 at least (the kill may
    # come before the worker saved epoch 2's).
    assert resumed.epoch >= 2 and resumed.step > 16
    restarted = server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    queued = [t for t in restarted.transitions if t.state == pb.JOB_STATE_QUEUED][1:]
    assert len(queued) == 1 and restarted.restarts == 1
    assert "SIGKILL" in queued[0].reason and "restart 1 of 1, from epoch" in queued[0].reason
    (second_worker,) = child_worker_pids()
    os.kill(second_worker, signal.SIGKILL)  # no restarts left
    failed = server.wait_for(job.job_id)
    assert failed.state == pb.JOB_STATE_FAILED and failed.restarts == 1
    # One line: the earlier restart's reason is in its own transition, not nested here.
    assert failed.failure_reason.endswith("(after 1 restarts)")
    assert "restart 1 of 1" not in failed.failure_reason


def test_list_jobs_newest_first_with_paging_and_filter(server, mnist_job):
    all_jobs = server.stub.ListJobs(pb.ListJobsRequest(page_size=1000)).jobs
    times = [j.create_time.ToNanoseconds() for j in all_jobs]
    assert times == sorted(times, reverse=True) and len(all_jobs) >= 3
    first = server.stub.ListJobs(pb.ListJobsRequest(page_size=2))
    second = server.stub.ListJobs(pb.ListJobsRequest(page_size=2, page_token=first.next_page_token))
    assert [j.job_id for j in [*first.jobs, *second.jobs]] == [j.job_id for j in all_jobs[:4]]
    succeeded = server.stub.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_SUCCEEDED])).jobs
    assert mnist_job[0].job_id in {j.job_id for j in succeeded}
    assert all(j.state == pb.JOB_STATE_SUCCEEDED for j in succeeded)


def test_server_info(server):
    info = server.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.version and info.tensorflow_version.startswith("2.") and info.python_version
    assert [d.name for d in info.devices] == ["CPU:0"]
    assert {"auto", "cpu", "mirrored"} <= set(info.strategies)
    assert info.queue_length == 0


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "ntrain.v1.TrainingService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    (response,) = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in response.list_services_response.service}
    assert {"ntrain.v1.TrainingService", "grpc.health.v1.Health"} <= names


def test_mirrored_job_over_logical_cpus(server):
    spec = job_spec(epochs=2, strategy=pb.StrategySpec(name="mirrored", device_count=2))
    job = server.submit(spec)
    events = server.events(job.job_id)
    done = server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
    assert done.strategy == "mirrored"
    assert (
        "2 replica(s)" in [t.reason for t in done.transitions if t.state == pb.JOB_STATE_RUNNING][0]
    )
    assert len([e for e in events if e.HasField("epoch_end")]) == 2


def test_restart_keeps_finished_jobs_histories_and_models(server, mnist_job):
    job, events = mnist_job
    running = server.submit(job_spec(epochs=100_000))
    queued = server.submit(job_spec(epochs=1, seed=7))
    server.wait_for(running.job_id, [pb.JOB_STATE_RUNNING])

    server.restart()

    after = server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    assert after == job
    assert server.events(job.job_id) == events
    # The running job checkpointed on the shutdown and goes on where it was.
    interrupted = server.wait_for(running.job_id, [pb.JOB_STATE_RUNNING])
    reasons = [t.reason for t in interrupted.transitions if t.state == pb.JOB_STATE_QUEUED]
    assert reasons[-1].startswith("resumed from epoch") and "after a server restart" in reasons[-1]
    server.stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id), timeout=60)
    resumed = server.wait_for(queued.job_id)
    assert resumed.state == pb.JOB_STATE_SUCCEEDED, resumed.failure_reason
    image = np.zeros(784, np.float32)
    prediction = server.stub.Predict(
        pb.PredictRequest(job_id=job.job_id, inputs=[pb.Example(values=image)]), timeout=120
    ).predictions[0]
    assert len(prediction.probabilities) == 10


def test_server_process_never_imports_tensorflow(tmp_path):
    """Serve a whole job (submit, watch, evaluate) in a fresh process without TensorFlow."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
        from ntrain.v1 import training_pb2 as pb
        from service_harness import RunningServer, job_spec

        if __name__ == "__main__":
            server = RunningServer({str(tmp_path)!r}, warm_worker=True)
            job = server.submit(job_spec())
            events = server.events(job.job_id)
            assert events[-1].state_change.state == pb.JOB_STATE_SUCCEEDED, events[-1]
            server.stub.Evaluate(pb.EvaluateRequest(job_id=job.job_id), timeout=120)
            server.stop()
            print("tensorflow" in sys.modules, "keras" in sys.modules)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == ["False", "False"]


def test_evaluate_on_mnist_that_cannot_be_found_is_failed_precondition(tmp_path, monkeypatch):
    """MNIST is looked up in the worker (it may download); when it is nowhere, the
    client hears FAILED_PRECONDITION with where it looked, never INTERNAL."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"  # Keras's download fails at once
    for name in ("NTRAIN_MNIST_PATH", "KERAS_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("https_proxy", closed)
    monkeypatch.setenv("HTTPS_PROXY", closed)
    for name in ("no_proxy", "NO_PROXY"):  # gRPC honours the proxy even for loopback
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    running = RunningServer(tmp_path / "state", warm_worker=False)
    try:
        job = running.submit(job_spec(epochs=1), request_id="synthetic-for-eval")
        assert running.wait_for(job.job_id).state == pb.JOB_STATE_SUCCEEDED
        with pytest.raises(grpc.RpcError) as error:
            running.stub.Evaluate(pb.EvaluateRequest(job_id=job.job_id, dataset="mnist"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "MNIST not found" in error.value.details()
    finally:
        running.stop()
