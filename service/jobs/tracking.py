"""MLflow tracking of jobs: one run per job, logged off the job's path.

The server calls `MlflowTracker` with the typed objects it already has, as a
job's life goes on (`TrackingObserver` does, from the control loop's events):
`job_started` (again after a restart: the job continues its run), `epoch_end`
for each epoch, `job_ended` once. Each call puts an event
on a bounded queue and returns; one background thread sends the events to the
tracking server with the MLflow client. A tracking server that is down, slow or
refusing never fails or slows a job: each failed or dropped event is reported
to `on_failure(job_id, message)`, which the server writes to the job's log and
counts (`ntrain_mlflow_log_failures_total`).

One run per job, whatever its strategy, hosts or restarts: the events come from
the server's own view of the job (never from workers), and a run's id is kept
in the job's folder (`mlflow_run_id`) and as the run's `ntrain.job_id` tag, so
a restarted server finds the run again instead of opening a second one.

A job opts out with the label `mlflow=off`.

An experiment is a run too, and its trials' runs are nested under it (MLflow's
`mlflow.parentRunId` tag): the experiment's run holds its spec as parameters,
the best metric so far (its step: trials finished) and, once every trial has
ended, the experiment's status. It is found again by its `ntrain.experiment_id`
tag, so a restarted server nests later trials under the same run.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from naive_model.results import EpochEnd
from service.protocol import JobState, StateChange

if TYPE_CHECKING:
    from service.jobs.experiments import ExperimentRecord
    from service.jobs.store import Event, JobRecord

log = logging.getLogger(__name__)

OPT_OUT_LABEL = ("mlflow", "off")
RUN_ID_FILE = "mlflow_run_id"
JOB_ID_TAG = "ntrain.job_id"
EXPERIMENT_ID_TAG = "ntrain.experiment_id"
PARENT_RUN_TAG = "mlflow.parentRunId"  # what MLflow's UI nests runs by
TRIAL_LABELS = ("experiment", "trial")  # a trial's job carries both
# The experiment run's status for each end of an experiment (ExperimentState's names).
EXPERIMENT_RUN_STATUS = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELED": "KILLED"}
# The run's status for each end of a job.
RUN_STATUS = {
    JobState.SUCCEEDED: "FINISHED",
    JobState.FAILED: "FAILED",
    JobState.CANCELED: "KILLED",
}
# The MLflow client retries a failed request up to 7 times with exponential
# backoff and waits 120 s for an answer: minutes per event with the server
# down. One retry and a short timeout keep the queue moving; the environment
# still wins where it sets these.
CLIENT_ENVIRONMENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # Else ending a run prints its URL to the server's stdout, after one more request.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
MAX_PARAMS_PER_BATCH = 100  # the tracking server's limit for one log-batch request
_JOB_ID = re.compile(r"[A-Za-z0-9_-]+")  # safe inside a search filter's quotes


@dataclass(frozen=True)
class _Started:
    record: JobRecord


@dataclass(frozen=True)
class _Epoch:
    job_id: str
    epoch: EpochEnd
    time_ms: int


@dataclass(frozen=True)
class _Ended:
    record: JobRecord
    model_dir: Path | None
    time_ms: int


@dataclass(frozen=True)
class _ExperimentChanged:
    record: ExperimentRecord
    time_ms: int


_Event = _Started | _Epoch | _Ended | _ExperimentChanged
_STOP = object()


def opted_out(record: JobRecord) -> bool:
    """Whether the job's labels ask for no MLflow run (`mlflow=off`)."""
    key, value = OPT_OUT_LABEL
    return dict(record.spec.labels).get(key) == value


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, text) of every leaf of nested dicts and lists: MLflow's parameters."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}{key}.")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from flatten(item, f"{prefix}{index}.")
    else:
        yield prefix.rstrip("."), str(value)


def run_params(record: JobRecord) -> list[tuple[str, str]]:
    """The JobSpec as parameters; its name and labels are tags instead."""
    spec = record.spec.to_dict()
    spec.pop("name", None)
    spec.pop("labels", None)
    return list(flatten(spec))


def experiment_of(record: JobRecord) -> str | None:
    """The experiment a trial's job belongs to; None for any other job."""
    labels = dict(record.spec.labels)
    return labels["experiment"] if all(key in labels for key in TRIAL_LABELS) else None


def experiment_params(record: ExperimentRecord) -> list[tuple[str, str]]:
    """The experiment's spec as parameters; its name is the run's name instead."""
    spec = record.spec.to_dict()
    spec.pop("name", None)
    return list(flatten(spec))


def run_tags(record: JobRecord) -> dict[str, str]:
    spec = record.spec
    tags = {JOB_ID_TAG: record.job_id, "ntrain.dataset": spec.dataset}
    if spec.name:
        tags["ntrain.name"] = spec.name
    if record.owner:
        tags["ntrain.owner"] = record.owner
        tags["mlflow.user"] = record.owner  # the "User" column of MLflow's UI
    for key, value in spec.labels:
        tags[f"ntrain.label.{key}"] = value
    return tags


def _one_line(error: BaseException) -> str:
    """The error's first line, short, without credentials a URL may carry."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"(\w+://)[^/\s@]+@", r"\1", text)
    return text if len(text) <= 300 else text[:297] + "..."


class MlflowTracker:
    """Logs jobs to an MLflow tracking server from a background thread.

    Args:
        tracking_uri: the tracking server, e.g. http://mlflow:5000.
        on_failure: called with (job_id, one-line message) for every event that
            failed or was dropped; from the tracker's thread, or from the caller's
            when the queue is full. It must not raise.
        job_dir: the folder of a job (`Store.job_dir`), where its run id is kept.
        experiment: the MLflow experiment the runs go to; created if missing.
        max_pending: events queued at most; more are dropped (and reported).

    Raises:
        ImportError: the MLflow client is not installed (the `mlflow` extra).
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        on_failure: Callable[[str, str], None],
        job_dir: Callable[[str], Path],
        experiment: str = "ntrain",
        max_pending: int = 1000,
    ):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        for name, value in CLIENT_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._on_failure = on_failure
        self._job_dir = job_dir
        self._experiment_name = experiment
        self._experiment_id: str | None = None
        self._queue: queue.Queue[Any] = queue.Queue(max_pending)
        self._lock = threading.Lock()  # between callers and close()
        self._closed = False
        self._abandon = threading.Event()
        # Owned by the tracker's thread alone.
        self._records: dict[str, JobRecord] = {}
        self._runs: dict[str, str] = {}
        self._skipped: set[str] = set()
        self._experiment_runs: dict[str, str] = {}  # experiment id -> its run
        self._experiment_logged: dict[str, tuple] = {}  # what was logged of each, last
        self._thread = threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # -- the server's calls: each returns at once ------------------------------

    def job_started(self, record: JobRecord) -> None:
        """The job starts, or starts again (a retry, or a resume after a server restart)."""
        self._put(_Started(record))

    def epoch_end(self, job_id: str, epoch: EpochEnd) -> None:
        """An epoch's training and evaluation figures, at step `epoch.epoch`."""
        self._put(_Epoch(job_id, epoch, _now_ms()))

    def job_ended(self, record: JobRecord, model_dir: Path | None) -> None:
        """The job reached a final state; `model_dir` is its exported model, if any."""
        self._put(_Ended(record, model_dir, _now_ms()))

    def experiment_changed(self, record: ExperimentRecord) -> None:
        """An experiment's snapshot: its run's parameters, best metric and, once settled, end."""
        self._put(_ExperimentChanged(record, _now_ms()))

    def close(self, timeout: float = 10.0) -> bool:
        """Take no more calls and send what is queued, for `timeout` seconds at most.

        Returns:
            Whether every queued event was handled in time; events left are not sent.
        """
        with self._lock:
            self._closed = True
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            self._abandon.set()
            return False
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()  # its current request ends by the client's timeout
            return False
        return True

    def _put(self, event: _Event) -> None:
        with self._lock:
            if self._closed:
                problem = "the tracker is closed"
            else:
                try:
                    self._queue.put_nowait(event)
                    return
                except queue.Full:
                    problem = f"{self._queue.maxsize} events are waiting already"
        self._report(event_job_id(event), f"MLflow: {describe(event)} not logged: {problem}")

    # -- the tracker's thread --------------------------------------------------

    def _drain(self) -> None:
        while not self._abandon.is_set():
            event = self._queue.get()
            if event is _STOP:
                return
            try:
                self._handle(event)
            except Exception as error:  # reported, never raised into a job
                self._report(
                    event_job_id(event), f"MLflow: {describe(event)} failed: {_one_line(error)}"
                )

    def _handle(self, event: _Event) -> None:
        match event:
            case _Started(record):
                if opted_out(record):
                    self._skipped.add(record.job_id)
                    return
                self._skipped.discard(record.job_id)
                self._records[record.job_id] = record
                self._start_run(record)
            case _Epoch(job_id, epoch, time_ms):
                if job_id in self._skipped:
                    return
                run_id = self._run_of(job_id)
                if run_id is None:
                    raise LookupError(f"no MLflow run for {job_id}: its start was not logged")
                self._log_metrics(run_id, epoch_metrics(epoch), time_ms, epoch.epoch)
            case _Ended(record, model_dir, time_ms):
                job_id = record.job_id
                if job_id in self._skipped or opted_out(record):
                    self._forget(job_id)
                    return
                try:
                    self._end_run(record, model_dir, time_ms)
                finally:
                    self._forget(job_id)
            case _ExperimentChanged(record, time_ms):
                self._log_experiment(record, time_ms)

    def _start_run(self, record: JobRecord) -> None:
        """Open the job's run, or find it again, and log its parameters and tags."""
        tags_of_run = run_tags(record)
        experiment_id = experiment_of(record)
        if experiment_id is not None:
            tags_of_run[PARENT_RUN_TAG] = self._experiment_run(experiment_id, record.owner)
        run_id = self._runs.get(record.job_id) or self._find_run(record.job_id)
        if run_id is None:
            run = self._client.create_run(
                self._experiment(),
                tags=tags_of_run,
                run_name=record.spec.name or record.job_id,
            )
            run_id = run.info.run_id
            self._remember(record.job_id, run_id)
        else:
            self._runs[record.job_id] = run_id
            self._client.update_run(run_id, status="RUNNING")
        # Again on a resume: logging a parameter with the value it has is allowed,
        # and it completes a start that failed half-way.
        self._log_params(run_id, run_params(record), tags_of_run)

    def _end_run(self, record: JobRecord, model_dir: Path | None, time_ms: int) -> None:
        from mlflow.entities import RunTag

        run_id = self._run_of(record.job_id)
        if run_id is None:  # it never started (canceled while queued): it has no run
            return
        step = record.progress.epoch if record.progress is not None else 0
        if record.result is not None:
            result = record.result
            final = {
                "test_loss": result.test_loss,
                "test_accuracy": result.test_accuracy,
                "examples_per_second": result.examples_per_second,
                "train_seconds": result.train_seconds,
            }
            self._log_metrics(run_id, final, time_ms, step)
        if record.failure_reason:
            reason = RunTag("ntrain.failure_reason", record.failure_reason[:5000])
            self._client.log_batch(run_id, tags=[reason])
        if model_dir is not None and model_dir.is_dir():
            try:
                self._client.log_artifacts(run_id, str(model_dir), artifact_path="model")
            except Exception as error:  # reported; the status is still set below
                self._report(record.job_id, f"MLflow: the model not logged: {_one_line(error)}")
        self._client.set_terminated(
            run_id, status=RUN_STATUS.get(record.state, "FAILED"), end_time=time_ms
        )

    def _experiment_run(self, experiment_id: str, owner: str) -> str:
        """The experiment's run: known, found by its tag (an earlier server's), or opened now."""
        if experiment_id in self._experiment_runs:
            return self._experiment_runs[experiment_id]
        run_id = self._run_tagged(EXPERIMENT_ID_TAG, experiment_id)
        if run_id is None:
            tags = {EXPERIMENT_ID_TAG: experiment_id}
            if owner:
                tags.update({"ntrain.owner": owner, "mlflow.user": owner})
            run_id = self._client.create_run(
                self._experiment(), tags=tags, run_name=experiment_id
            ).info.run_id
        self._experiment_runs[experiment_id] = run_id
        return run_id

    def _log_experiment(self, record: ExperimentRecord, time_ms: int) -> None:
        """Log what changed of an experiment: its spec once, its best metric, its end."""
        from mlflow.entities import RunTag

        experiment_id = record.experiment_id
        run_id = self._experiment_run(experiment_id, record.owner)
        logged = self._experiment_logged.get(experiment_id)
        if logged is None:  # once per server: the same values again are allowed
            tags = {EXPERIMENT_ID_TAG: experiment_id}
            if record.spec.name:
                tags["mlflow.runName"] = record.spec.name
            self._log_params(run_id, experiment_params(record), tags)
            logged = ()
        finished = sum(trial.state.finished for trial in record.trials)
        best = record.trials[record.best_trial] if record.best_trial is not None else None
        now = (finished, None if best is None else (best.number, best.metric))
        if best is not None and best.metric is not None and now != logged:
            values = {f"best_{record.spec.metric}": best.metric, "best_trial": best.number}
            self._log_metrics(run_id, values, time_ms, finished)
        self._experiment_logged[experiment_id] = now
        if record.settled:
            status = EXPERIMENT_RUN_STATUS.get(record.state.name, "FAILED")
            if record.reason:
                self._client.log_batch(run_id, tags=[RunTag("ntrain.reason", record.reason)])
            self._client.set_terminated(run_id, status=status, end_time=time_ms)
            self._experiment_runs.pop(experiment_id, None)
            self._experiment_logged.pop(experiment_id, None)

    def _log_params(self, run_id: str, params: list[tuple[str, str]], tags: dict[str, str]):
        """Parameters and tags, in as many requests as the tracking server's batch limit needs."""
        from mlflow.entities import Param, RunTag

        param_entities = [Param(key, value) for key, value in params]
        tag_entities = [RunTag(key, value) for key, value in tags.items()]
        for start in range(0, max(len(param_entities), 1), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(
                run_id,
                params=param_entities[start : start + MAX_PARAMS_PER_BATCH],
                tags=tag_entities if start == 0 else [],
            )

    def _log_metrics(self, run_id: str, values: dict[str, float], time_ms: int, step: int):
        from mlflow.entities import Metric

        metrics = [Metric(key, float(value), time_ms, step) for key, value in values.items()]
        self._client.log_batch(run_id, metrics=metrics)

    def _run_of(self, job_id: str) -> str | None:
        """The job's run: known, found again, or opened now from its start's record.

        None when the tracker never saw the job start and no run of it exists.
        """
        if job_id in self._runs:
            return self._runs[job_id]
        record = self._records.get(job_id)
        if record is not None:  # the start failed (the server was down): try it again
            self._start_run(record)
            return self._runs[job_id]
        run_id = self._find_run(job_id)
        if run_id is not None:
            self._runs[job_id] = run_id
        return run_id

    def _find_run(self, job_id: str) -> str | None:
        """The run of an earlier server: the id in the job's folder, or the job id's tag."""
        from mlflow.exceptions import MlflowException

        path = self._job_dir(job_id) / RUN_ID_FILE
        kept = path.read_text().strip() if path.is_file() else ""
        if kept:
            try:
                if self._client.get_run(kept).info.lifecycle_stage == "active":
                    return kept
            except MlflowException as error:  # another tracking server's run, or deleted
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        run_id = self._run_tagged(JOB_ID_TAG, job_id)
        if run_id is not None:
            self._remember(job_id, run_id)
        return run_id

    def _run_tagged(self, tag: str, value: str) -> str | None:
        """The run whose `tag` is `value` (a job's or an experiment's id), if there is one."""
        if not _JOB_ID.fullmatch(value):  # only ids that are safe inside the filter's quotes
            return None
        runs = self._client.search_runs(
            [self._experiment()], filter_string=f"tags.`{tag}` = '{value}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def _remember(self, job_id: str, run_id: str) -> None:
        self._runs[job_id] = run_id
        folder = self._job_dir(job_id)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = folder / f".{RUN_ID_FILE}.partial"
        partial.write_text(run_id + "\n")
        partial.replace(folder / RUN_ID_FILE)

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self._client.get_experiment_by_name(self._experiment_name)
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                self._experiment_id = self._client.create_experiment(self._experiment_name)
        return self._experiment_id

    def _forget(self, job_id: str) -> None:
        self._records.pop(job_id, None)
        self._runs.pop(job_id, None)
        self._skipped.discard(job_id)

    def _report(self, job_id: str, message: str) -> None:
        try:
            self._on_failure(job_id, message)
        except Exception:
            log.exception("on_failure raised for %s: %s", job_id, message)


def epoch_metrics(epoch: EpochEnd) -> dict[str, float]:
    metrics = {
        "train_loss": epoch.train_loss,
        "train_accuracy": epoch.train_accuracy,
        "epoch_seconds": epoch.seconds,
    }
    if epoch.eval_loss is not None:
        metrics["eval_loss"] = epoch.eval_loss
    if epoch.eval_accuracy is not None:
        metrics["eval_accuracy"] = epoch.eval_accuracy
    return metrics


def event_job_id(event: _Event) -> str:
    """The job whose log hears of the event's failure (an experiment's: its id)."""
    if isinstance(event, _Epoch):
        return event.job_id
    if isinstance(event, _ExperimentChanged):
        return event.record.experiment_id
    return event.record.job_id


def describe(event: _Event) -> str:
    if isinstance(event, _Epoch):
        return f"epoch {event.epoch.epoch}"
    if isinstance(event, _ExperimentChanged):
        return "the experiment's run"
    return "the run's start" if isinstance(event, _Started) else "the run's end"


def _now_ms() -> int:
    return int(time.time() * 1000)


class TrackingObserver:
    """Tells a tracker of each job's life from the control loop's stored events.

    A job starts (again) when it is handed to a runner (STARTING), or at its
    first event in this server when a restarted server follows its Ray job
    again; each EpochEnd is an epoch; a final state ends it. A job put back in
    the queue (a restart, a preemption) keeps its run open.
    """

    def __init__(self, tracker: MlflowTracker, model_dir: Callable[[str], Path | None]):
        self.tracker = tracker
        self._model_dir = model_dir
        self._started: set[str] = set()  # jobs started in this server (the loop's thread only)

    def job_event(self, record: JobRecord, event: Event) -> None:
        payload = event.payload
        if record.finished:
            if isinstance(payload, StateChange):
                self._started.discard(record.job_id)
                self.tracker.job_ended(record, self._model_dir(record.job_id))
            return
        starting = isinstance(payload, StateChange) and payload.state is JobState.STARTING
        if starting or (
            record.job_id not in self._started and not isinstance(payload, StateChange)
        ):
            self._started.add(record.job_id)
            self.tracker.job_started(record)
        if isinstance(payload, EpochEnd):
            self.tracker.epoch_end(record.job_id, payload)
