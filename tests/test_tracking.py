"""MlflowTracker against a real MLflow tracking server.

`mlflow server` (the dev extra installs it) runs in a subprocess on a free
loopback port with a SQLite backend and proxied artifacts in a temporary
folder, and the tracker logs jobs to it as the server would: a start, epochs,
an end. The tests read the runs back through MLflow's own client. A tracking
server that is down or never answers must cost a job nothing: every call
returns at once and each lost event is reported to `on_failure`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import IN_CI, require_tool

from naive_model.config import LayerSpec, TrainConfig
from naive_model.results import EpochEnd, Progress, TrainingResult
from service.jobs.experiment_spec import ExperimentSpec, FloatParameter
from service.jobs.experiments import ExperimentRecord, ExperimentState, TrialRecord, TrialState
from service.jobs.store import JobRecord
from service.jobs.tracking import RUN_ID_FILE, MlflowTracker, flatten
from service.protocol import JobSpec, JobState

if importlib.util.find_spec("mlflow") is None:  # the mlflow extra; the dev extra has it
    if IN_CI:
        raise ImportError("mlflow is not installed: the dev extra installs it")
    pytest.skip("mlflow is not installed", allow_module_level=True)
from mlflow import tracking as mlflow_tracking  # noqa: E402 - after the check above

START_SECONDS = 240  # a minute on a quiet 2-core machine: imports, SQLite's schema
pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """The URL of a real `mlflow server` on loopback: SQLite runs, proxied artifacts."""
    mlflow = require_tool("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    temporary = root / "tmp"
    temporary.mkdir()
    command = [
        mlflow, "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers go with it when stopped
            env={
                **os.environ,
                # No job runner (a pool of huey consumer processes): runs need none.
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "TMPDIR": str(temporary),  # what it writes there goes with the test's folder
            },
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _healthy(url):
            assert process.poll() is None, f"mlflow server exited:\n{log_path.read_text()}"
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up in {START_SECONDS} s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Failures:
    """on_failure's calls, from whichever thread."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, job_id: str, message: str) -> None:
        with self._lock:
            self.calls.append((job_id, message))


def _record(**changes) -> JobRecord:
    spec = JobSpec(
        train=TrainConfig(
            layers=(
                LayerSpec(units=64, activation="relu"),
                LayerSpec(units=10, activation="softmax"),
            ),
            batch_size=32,
            epochs=2,
        ),
        dataset="synthetic",
        strategy="cpu",
        name="digits baseline",
        labels=(("team", "vision"),),
    )
    record = JobRecord(
        job_id=f"job-{uuid.uuid4().hex[:12]}",
        request_id="request-1",
        spec=spec,
        state=JobState.RUNNING,
        create_time=time.time(),
        strategy="cpu",
        owner="alice",
    )
    return dataclasses.replace(record, **changes)


def _epoch(epoch: int, *, evaluated: bool = True) -> EpochEnd:
    return EpochEnd(
        epoch=epoch,
        train_loss=1.0 / epoch,
        train_accuracy=0.5 + epoch / 10,
        eval_loss=1.5 / epoch if evaluated else None,
        eval_accuracy=0.4 + epoch / 10 if evaluated else None,
        seconds=2.0,
    )


def _ended(record: JobRecord, state: JobState, **changes) -> JobRecord:
    progress = Progress(
        epoch=2, epochs=2, step=20, steps_per_epoch=10, step_in_epoch=10,
        loss=0.5, accuracy=0.7, examples_per_second=1000.0, examples=640,
    )  # fmt: skip
    return dataclasses.replace(record, state=state, progress=progress, **changes)


def _runs_of(client, job_id: str) -> list:
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`ntrain.job_id` = '{job_id}'",
    )


def _steps(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_a_job_is_one_run_with_its_spec_tags_epochs_status_and_model(tracking_server, tmp_path):
    failures = Failures()
    tracker = MlflowTracker(
        tracking_server, on_failure=failures, job_dir=lambda job_id: tmp_path / job_id
    )
    record = _record()
    model = tmp_path / "export" / "model"
    (model / "variables").mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"a saved model")
    (model / "variables" / "variables.index").write_bytes(b"weights")

    tracker.job_started(record)
    tracker.epoch_end(record.job_id, _epoch(1, evaluated=False))
    tracker.epoch_end(record.job_id, _epoch(2))
    result = TrainingResult(
        train_loss=0.5, train_accuracy=0.7, test_loss=0.6, test_accuracy=0.65, steps=20,
        train_seconds=4.0, examples_per_second=1000.0, has_model=True,
    )  # fmt: skip
    tracker.job_ended(_ended(record, JobState.SUCCEEDED, result=result), model)
    assert tracker.close(60)
    assert failures.calls == []

    client = mlflow_tracking.MlflowClient(tracking_server)
    (run,) = _runs_of(client, record.job_id)
    run_id = run.info.run_id
    assert (tmp_path / record.job_id / RUN_ID_FILE).read_text().strip() == run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "digits baseline"
    params = run.data.params
    assert params["dataset"] == "synthetic" and params["strategy"] == "cpu"
    assert params["train.layers.0.units"] == "64"
    assert params["train.layers.1.activation"] == "softmax"
    assert params["train.batch_size"] == "32" and params["train.epochs"] == "2"
    spec = {k: v for k, v in record.spec.to_dict().items() if k not in ("name", "labels")}
    assert params == dict(flatten(spec))  # the whole JobSpec; its name and labels are tags
    tags = run.data.tags
    assert tags["ntrain.job_id"] == record.job_id and tags["ntrain.dataset"] == "synthetic"
    assert tags["ntrain.name"] == "digits baseline" and tags["ntrain.owner"] == "alice"
    assert tags["ntrain.label.team"] == "vision" and tags["mlflow.user"] == "alice"
    # Per epoch on the step axis; evaluation only where the epoch was evaluated.
    assert _steps(client, run_id, "train_loss") == [(1, 1.0), (2, 0.5)]
    assert [step for step, _ in _steps(client, run_id, "eval_accuracy")] == [2]
    assert _steps(client, run_id, "test_accuracy") == [(2, 0.65)]
    # The model, as an artifact the tracking server stores.
    listed = {f.path for f in client.list_artifacts(run_id, "model")}
    assert listed == {"model/saved_model.pb", "model/variables"}
    downloaded = Path(client.download_artifacts(run_id, "model", str(tmp_path / "download")))
    assert (downloaded / "saved_model.pb").read_bytes() == b"a saved model"
    assert (downloaded / "variables" / "variables.index").read_bytes() == b"weights"


def _experiment(state: ExperimentState, trials: tuple[TrialRecord, ...], best: int | None):
    base = _record().spec
    spec = ExperimentSpec(
        base=base,
        parameters=(FloatParameter(name="train.learning_rate", low=1e-4, high=1e-1, log=True),),
        max_trials=2,
        name="lr search",
    )
    return ExperimentRecord(
        experiment_id="exp-0123456789ab",
        request_id="",
        owner="alice",
        spec=spec,
        state=state,
        reason="all 2 trials ran" if state is not ExperimentState.RUNNING else "",
        create_time=time.time(),
        end_time=None,
        trials=trials,
        best_trial=best,
    )


@pytest.mark.slow
def test_an_experiments_trials_are_runs_nested_under_its_own_run(tracking_server, tmp_path):
    failures = Failures()
    tracker = MlflowTracker(
        tracking_server, on_failure=failures, job_dir=lambda job_id: tmp_path / job_id
    )
    trials = [
        _record(spec=dataclasses.replace(
            _record().spec, labels=(("experiment", "exp-0123456789ab"), ("trial", str(n)))
        ))
        for n in range(2)
    ]  # fmt: skip
    running = _experiment(ExperimentState.RUNNING, (), None)
    tracker.experiment_changed(running)
    done = []
    for number, trial in enumerate(trials):
        tracker.job_started(trial)
        tracker.epoch_end(trial.job_id, _epoch(1))
        tracker.job_ended(_ended(trial, JobState.SUCCEEDED), None)
        done.append(TrialRecord(
            number=number, params=(("train.learning_rate", 0.01),), job_id=trial.job_id,
            state=TrialState.SUCCEEDED, epochs=1, metric=0.5 + number / 10,
        ))  # fmt: skip
        tracker.experiment_changed(_experiment(ExperimentState.RUNNING, tuple(done), best=number))
    tracker.experiment_changed(_experiment(ExperimentState.SUCCEEDED, tuple(done), best=1))
    assert tracker.close(60)
    assert failures.calls == []

    client = mlflow_tracking.MlflowClient(tracking_server)
    (parent,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`ntrain.experiment_id` = 'exp-0123456789ab'",
    )
    assert parent.info.status == "FINISHED" and parent.info.run_name == "lr search"
    assert parent.data.tags["mlflow.user"] == "alice"
    assert parent.data.params["max_trials"] == "2"
    assert parent.data.params["parameters.0.name"] == "train.learning_rate"
    # The best metric so far, on the axis of trials finished.
    assert _steps(client, parent.info.run_id, "best_eval_accuracy") == [(1, 0.5), (2, 0.6)]
    for trial in trials:
        (run,) = _runs_of(client, trial.job_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("run_id_file", ["kept", "lost", "foreign"])
def test_a_resumed_job_continues_its_run_after_a_server_restart(
    tracking_server, tmp_path, run_id_file
):
    """A new tracker (a restarted server) finds the run: by the job folder's file, or its tag.

    A file naming a run this tracking server does not have (another server's) falls back
    to the tag.
    """
    failures = Failures()
    record = _record()
    job_dir = tmp_path / record.job_id
    first = MlflowTracker(tracking_server, on_failure=failures, job_dir=lambda _: job_dir)
    first.job_started(record)
    first.epoch_end(record.job_id, _epoch(1))
    assert first.close(60)
    if run_id_file == "lost":
        (job_dir / RUN_ID_FILE).unlink()
    elif run_id_file == "foreign":
        (job_dir / RUN_ID_FILE).write_text(uuid.uuid4().hex + "\n")

    second = MlflowTracker(tracking_server, on_failure=failures, job_dir=lambda _: job_dir)
    second.job_started(record)
    second.epoch_end(record.job_id, _epoch(2))
    second.job_ended(_ended(record, JobState.CANCELED), None)  # no model: nothing to upload
    assert second.close(60)
    assert failures.calls == []

    client = mlflow_tracking.MlflowClient(tracking_server)
    (run,) = _runs_of(client, record.job_id)
    assert [step for step, _ in _steps(client, run.info.run_id, "train_loss")] == [1, 2]
    assert run.info.status == "KILLED"
    assert client.list_artifacts(run.info.run_id) == []


@pytest.mark.slow
def test_a_failed_job_is_a_failed_run_with_its_reason(tracking_server, tmp_path):
    failures = Failures()
    tracker = MlflowTracker(tracking_server, on_failure=failures, job_dir=lambda j: tmp_path / j)
    record = _record()
    tracker.job_started(record)
    tracker.job_ended(_ended(record, JobState.FAILED, failure_reason="the loss diverged"), None)
    assert tracker.close(60)
    assert failures.calls == []
    (run,) = _runs_of(mlflow_tracking.MlflowClient(tracking_server), record.job_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["ntrain.failure_reason"] == "the loss diverged"


@pytest.mark.slow
def test_a_job_labelled_mlflow_off_has_no_run(tracking_server, tmp_path):
    failures = Failures()
    tracker = MlflowTracker(tracking_server, on_failure=failures, job_dir=lambda j: tmp_path / j)
    record = _record(spec=dataclasses.replace(_record().spec, labels=(("mlflow", "off"),)))
    tracker.job_started(record)
    tracker.epoch_end(record.job_id, _epoch(1))
    tracker.job_ended(_ended(record, JobState.SUCCEEDED), None)
    assert tracker.close(60)
    assert failures.calls == []
    assert _runs_of(mlflow_tracking.MlflowClient(tracking_server), record.job_id) == []
    assert not (tmp_path / record.job_id / RUN_ID_FILE).exists()


@pytest.mark.slow
def test_a_job_that_never_started_has_no_run_and_no_failure(tracking_server, tmp_path):
    """A job canceled while queued ends without a start: nothing to log, nothing wrong."""
    failures = Failures()
    tracker = MlflowTracker(tracking_server, on_failure=failures, job_dir=lambda j: tmp_path / j)
    record = _record()
    tracker.job_ended(dataclasses.replace(record, state=JobState.CANCELED), None)
    tracker.epoch_end(record.job_id, _epoch(1))  # an epoch without a start is a mistake
    assert tracker.close(60)
    assert _runs_of(mlflow_tracking.MlflowClient(tracking_server), record.job_id) == []
    assert failures.calls == [
        (record.job_id, f"MLflow: epoch 1 failed: no MLflow run for {record.job_id}: "
         "its start was not logged")
    ]  # fmt: skip


def test_a_down_tracking_server_is_reported_and_never_blocks(tmp_path):
    failures = Failures()
    nothing_listens = f"http://127.0.0.1:{_free_port()}"
    tracker = MlflowTracker(nothing_listens, on_failure=failures, job_dir=lambda j: tmp_path / j)
    record = _record()
    began = time.monotonic()
    tracker.job_started(record)
    tracker.epoch_end(record.job_id, _epoch(1))
    tracker.job_ended(_ended(record, JobState.SUCCEEDED), None)
    assert time.monotonic() - began < 0.5  # the job's side: three calls, no request
    assert tracker.close(60), "connection refused must fail fast, retries included"
    assert time.monotonic() - began < 60
    assert [job_id for job_id, _ in failures.calls] == [record.job_id] * 3
    messages = [message for _, message in failures.calls]
    assert messages[0].startswith("MLflow: the run's start failed: ")
    assert messages[1].startswith("MLflow: epoch 1 failed: ")
    assert messages[2].startswith("MLflow: the run's end failed: ")


def test_a_tracking_server_that_never_answers_costs_a_job_nothing(tmp_path, monkeypatch):
    """Calls return at once; past `max_pending` events are dropped and reported, not queued."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        failures = Failures()
        tracker = MlflowTracker(
            f"http://127.0.0.1:{silent.getsockname()[1]}",
            on_failure=failures,
            job_dir=lambda j: tmp_path / j,
            max_pending=2,
        )
        record = _record()
        began = time.monotonic()
        tracker.job_started(record)
        for epoch in range(1, 11):
            tracker.epoch_end(record.job_id, _epoch(epoch))
        assert time.monotonic() - began < 0.5
        # The thread holds one event in a request, two wait: the other 8 are dropped.
        dropped = [m for _, m in failures.calls if "not logged" in m]
        assert len(dropped) >= 8, failures.calls
        assert all("events are waiting already" in m for m in dropped)
        began = time.monotonic()
        tracker.close(timeout=1)
        assert time.monotonic() - began < 3  # gives up on what is left


@pytest.mark.slow
def test_a_servers_job_is_one_mlflow_run_across_a_restart(tracking_server, tmp_path):
    """`ntrain serve --mlflow-tracking-uri`: a job restarted after its worker died keeps its run."""
    from ntrain.v1 import training_pb2 as pb
    from service_harness import RunningServer, child_worker_pids, job_spec

    server = RunningServer(tmp_path / "state", mlflow_tracking_uri=tracking_server)
    try:
        spec = job_spec(epochs=3, steps_per_execution=4, name="tracked", labels={"team": "x"})
        job = server.submit(spec)
        deadline = time.monotonic() + 300
        while server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).progress.epoch < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for pid in child_worker_pids():  # its worker dies: one restart from its checkpoint
            os.kill(pid, signal.SIGKILL)
        done = server.wait_for(job.job_id)
        assert done.state == pb.JOB_STATE_SUCCEEDED and done.restarts == 1
    finally:
        server.stop()  # closes the tracker: what it queued is sent

    client = mlflow_tracking.MlflowClient(tracking_uri=tracking_server)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`ntrain.job_id` = '{job.job_id}'",
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["ntrain.label.team"] == "x"
    assert run.data.params["train.epochs"] == "3"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted({point.step for point in history}) == [1, 2, 3]
    assert run.data.metrics["test_accuracy"] == pytest.approx(done.result.test_accuracy)
    artifacts = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "model")]
    assert "model/saved_model.pb" in artifacts
