"""The server's Prometheus metrics (the endpoint serving them: `service.metrics_http`).

The job manager calls the hooks of `ServiceMetrics`; nothing else writes the
metrics. Every metric lives in the `registry` given to `ServiceMetrics`, so a
test can use a fresh `CollectorRegistry` and read it with `get_sample_value`;
beside them it holds prometheus_client's standard `process_*` and `python_*`
collectors.

Training series carry a `job_id` label. To keep the number of series bounded
by recent jobs rather than by every job ever run, a job's series are removed
`job_series_retention_seconds` after `job_finished`; the removal runs on each
scrape and whenever the server calls `remove_expired_job_series`.

Experiment series carry an `experiment_id` label, bounded the same way: at
most MAX_RUNNING_EXPERIMENTS experiments run at once (service.jobs.experiments
refuses more), and an ended experiment's series are removed once the same
retention window has passed after `experiment_ended`. So there are at most
7 trial-state series and 1 best-metric series per running or recently ended
experiment.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics import MetricWrapperBase

from service.protocol import JobState

log = logging.getLogger(__name__)

# The `_created` series client_python adds to every counter and histogram would
# double the per-job series for a timestamp nobody graphs. (A process-wide switch.)
disable_created_metrics()

OUTCOMES = ("succeeded", "failed", "canceled")
DEVICE_TYPES = ("GPU", "CPU")
JOB_LABELS = ("job_id", "strategy")

# Bucket edges in seconds. One compiled call's mean step runs from well under a
# millisecond (a GPU) to a second (a large CPU batch).
STEP_BUCKETS = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)  # fmt: skip
CHECKPOINT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
FIRST_STEP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass
class _JobSeries:
    """The label values one job has used, so its series can be removed together."""

    strategies: set[str] = field(default_factory=set)
    gpu_devices: set[tuple[str, str]] = field(default_factory=set)  # (strategy, device)
    expires_at: float | None = None


@dataclass
class _ExperimentSeries:
    states: set[str] = field(default_factory=set)
    metrics: set[str] = field(default_factory=set)
    expires_at: float | None = None


class _ExpireOnScrape:
    """A collector with no metrics of its own: it drops expired job series before a scrape.

    It is registered before every metric, so the registry runs it first.
    """

    def __init__(self, metrics: ServiceMetrics):
        self._metrics = metrics

    def describe(self) -> Iterable:
        return ()

    def collect(self) -> Iterable:
        self._metrics.remove_expired_job_series()
        self._metrics.remove_expired_experiment_series()
        return ()


class ServiceMetrics:
    """Training, job and service metrics, updated by the job manager.

    Args:
        registry: where the metrics live; a fresh `CollectorRegistry` by default.
        job_series_retention_seconds: how long a finished job's training series remain.
        clock: monotonic seconds; tests pass a fake to move time without sleeping.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        job_series_retention_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if job_series_retention_seconds < 0:
            raise ValueError(
                f"job_series_retention_seconds must be >= 0, got {job_series_retention_seconds}"
            )
        self.registry = registry if registry is not None else CollectorRegistry()
        self.retention_seconds = job_series_retention_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, _JobSeries] = {}
        # Experiments with series: their label values, and when an ended one's expire.
        self._experiments: dict[str, _ExperimentSeries] = {}
        self.registry.register(_ExpireOnScrape(self))
        r = self.registry
        # The standard series of every Python exporter, unprefixed as everywhere:
        # process_* (CPU seconds, resident memory, open files, start time),
        # python_info and python_gc_*. The server's own process only: workers
        # are children, not counted here.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        # Training, per job. Removed once the job's retention window passes.
        self.train_batches = Counter(
            "ntrain_train_batches", "Training steps (batches) run.", JOB_LABELS, registry=r
        )
        self.train_examples = Counter(
            "ntrain_train_examples", "Training examples processed.", JOB_LABELS, registry=r
        )
        self.train_loss = Gauge(
            "ntrain_train_loss",
            "Mean training loss of the current epoch so far.",
            JOB_LABELS,
            registry=r,
        )
        self.train_accuracy = Gauge(
            "ntrain_train_accuracy_ratio",
            "Training accuracy of the current epoch so far (0 to 1).",
            JOB_LABELS,
            registry=r,
        )
        self.train_epoch = Gauge(
            "ntrain_train_epoch", "The epoch being trained (1-based).", JOB_LABELS, registry=r
        )
        self.train_examples_per_second = Gauge(
            "ntrain_train_examples_per_second",
            "Training throughput over the job's steady calls.",
            JOB_LABELS,
            registry=r,
        )
        self.train_running = Gauge(
            "ntrain_train_running",
            "1 while the job trains, 0 once it has finished (until its series are removed).",
            JOB_LABELS,
            registry=r,
        )
        self.train_step_duration = Histogram(
            "ntrain_train_step_duration_seconds",
            "Mean step duration of each compiled call (one observation per call).",
            JOB_LABELS,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.eval_loss = Gauge(
            "ntrain_eval_loss",
            "Test-split loss at the end of the last epoch.",
            JOB_LABELS,
            registry=r,
        )
        self.eval_accuracy = Gauge(
            "ntrain_eval_accuracy_ratio",
            "Test-split accuracy at the end of the last epoch (0 to 1).",
            JOB_LABELS,
            registry=r,
        )
        self.checkpoint_save_duration = Histogram(
            "ntrain_checkpoint_save_duration_seconds",
            "Time to write one checkpoint.",
            JOB_LABELS,
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.job_preemptions = Counter(
            "ntrain_job_preemptions",
            "Times the job was stopped at a step boundary to make room for a job of higher "
            "priority (it resumes where it stood).",
            JOB_LABELS,
            registry=r,
        )
        # What TensorFlow's allocator reports (tf.config.experimental.get_memory_info):
        # memory given to tensors, not the CUDA context or the allocator's unused pool.
        self.gpu_memory_in_use = Gauge(
            "ntrain_gpu_memory_in_use_bytes",
            "GPU memory TensorFlow's allocator had given the job's tensors at the end of "
            "the last epoch, per device; not the CUDA context or reserved but unused memory.",
            (*JOB_LABELS, "device"),
            registry=r,
        )
        self.gpu_memory_peak = Gauge(
            "ntrain_gpu_memory_peak_bytes",
            "Most GPU memory TensorFlow's allocator gave the job's tensors at once during "
            "the last epoch (its evaluation included), per device; reset each epoch.",
            (*JOB_LABELS, "device"),
            registry=r,
        )
        self._job_metrics: tuple[MetricWrapperBase, ...] = (
            self.train_batches, self.train_examples, self.train_loss, self.train_accuracy,
            self.train_epoch, self.train_examples_per_second, self.train_running,
            self.train_step_duration, self.eval_loss, self.eval_accuracy,
            self.checkpoint_save_duration, self.job_preemptions,
        )  # fmt: skip

        # The service. Label values come from small fixed sets.
        self.jobs = Gauge("ntrain_jobs", "Jobs by state.", ("state",), registry=r)
        self.jobs_finished = Counter(
            "ntrain_jobs_finished", "Jobs that ended, by outcome.", ("outcome",), registry=r
        )
        self.job_duration = Histogram(
            "ntrain_job_duration_seconds",
            "Run time of finished jobs, from worker start to end.",
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        self.queue_length = Gauge("ntrain_queue_length", "Jobs waiting to run.", registry=r)
        self.submit_to_first_step = Histogram(
            "ntrain_submit_to_first_step_seconds",
            "Time from a job's submission to its first training progress.",
            buckets=FIRST_STEP_BUCKETS,
            registry=r,
        )
        self.devices = Gauge("ntrain_devices", "Devices found, by type.", ("type",), registry=r)
        self.warm_workers = Gauge(
            "ntrain_warm_workers",
            "Worker processes with TensorFlow loaded, ready for a job.",
            registry=r,
        )
        # Experiments, per experiment; removed once an ended one's retention passes.
        self.experiment_trials = Gauge(
            "ntrain_experiment_trials",
            "Trials of an experiment by state (pending, queued, running, succeeded, "
            "stopped_early, failed, canceled).",
            ("experiment_id", "state"),
            registry=r,
        )
        self.experiment_best_metric = Gauge(
            "ntrain_experiment_best_metric",
            "The best final metric of an experiment's finished trials so far.",
            ("experiment_id", "metric"),
            registry=r,
        )
        self.build_info = Gauge(
            "ntrain_build_info",
            "Always 1; the labels name the versions this server runs.",
            ("version", "tensorflow_version", "python_version"),
            registry=r,
        )
        self.mlflow_log_failures = Counter(
            "ntrain_mlflow_log_failures",
            "Calls to the MLflow tracking server that failed or were dropped; the job's log "
            "says which.",
            registry=r,
        )
        # Series that exist from the start, so rates and alerts see the first change.
        for state in JobState:
            self.jobs.labels(state.name).set(0)
        for outcome in OUTCOMES:
            self.jobs_finished.labels(outcome)
        for kind in DEVICE_TYPES:
            self.devices.labels(kind).set(0)

    # -- the service ---------------------------------------------------------------

    def set_build_info(self, *, version: str, tensorflow_version: str, python_version: str) -> None:
        self.build_info.clear()
        self.build_info.labels(version, tensorflow_version, python_version).set(1)

    def set_devices(self, counts: Mapping[str, int]) -> None:
        """Devices by type, e.g. {"GPU": 4, "CPU": 1}; types not given read 0."""
        for kind in set(DEVICE_TYPES) | set(counts):
            self.devices.labels(kind).set(counts.get(kind, 0))

    def set_warm_workers(self, ready: int) -> None:
        self.warm_workers.set(ready)

    def set_queue_length(self, length: int) -> None:
        self.queue_length.set(length)

    def set_jobs_by_state(self, counts: Mapping[JobState, int]) -> None:
        """Jobs by state, labelled by its name; every state is exposed, states not given read 0."""
        for state in JobState:
            self.jobs.labels(state.name).set(counts.get(state, 0))

    def mlflow_log_failed(self) -> None:
        """One call to the MLflow tracking server failed or was dropped (`MlflowTracker`)."""
        self.mlflow_log_failures.inc()

    # -- experiments -----------------------------------------------------------------

    def set_experiment_trials(self, experiment_id: str, counts: Mapping[str, int]) -> None:
        """An experiment's trials by state (lower-case state names)."""
        with self._lock:
            series = self._experiments.setdefault(experiment_id, _ExperimentSeries())
            series.states.update(counts)
            series.expires_at = None
        for state, count in counts.items():
            self.experiment_trials.labels(experiment_id, state).set(count)

    def set_experiment_best(self, experiment_id: str, metric: str, value: float) -> None:
        """The best final `metric` ("eval_accuracy", "eval_loss") of its trials so far."""
        with self._lock:
            series = self._experiments.setdefault(experiment_id, _ExperimentSeries())
            series.metrics.add(metric)
        self.experiment_best_metric.labels(experiment_id, metric).set(value)

    def experiment_ended(self, experiment_id: str) -> None:
        """Start the retention window of an ended (and settled) experiment's series."""
        with self._lock:
            series = self._experiments.get(experiment_id)
            if series is not None and series.expires_at is None:
                series.expires_at = self._clock() + self.retention_seconds

    def remove_expired_experiment_series(self) -> int:
        """Remove the series of experiments whose retention window has passed."""
        now = self._clock()
        with self._lock:
            expired = [
                (experiment_id, self._experiments.pop(experiment_id))
                for experiment_id, series in list(self._experiments.items())
                if series.expires_at is not None and series.expires_at <= now
            ]
        for experiment_id, series in expired:
            for state in series.states:
                self.experiment_trials.remove(experiment_id, state)
            for metric in series.metrics:
                self.experiment_best_metric.remove(experiment_id, metric)
        return len(expired)

    # -- jobs ----------------------------------------------------------------------

    def job_first_step(self, job_id: str, seconds_since_submit: float) -> None:
        self.submit_to_first_step.observe(seconds_since_submit)

    def job_progress(
        self,
        job_id: str,
        strategy: str,
        *,
        epoch: int,
        batches: int,
        examples: int,
        loss: float,
        accuracy: float,
        examples_per_second: float,
        step_seconds: float,
    ) -> None:
        """One compiled call's progress: `batches` and `examples` are this call's increments."""
        self._track(job_id, strategy)
        labels = (job_id, strategy)
        self.train_batches.labels(*labels).inc(batches)
        self.train_examples.labels(*labels).inc(examples)
        self.train_loss.labels(*labels).set(loss)
        self.train_accuracy.labels(*labels).set(accuracy)
        self.train_epoch.labels(*labels).set(epoch)
        self.train_examples_per_second.labels(*labels).set(examples_per_second)
        self.train_running.labels(*labels).set(1)
        if batches:
            self.train_step_duration.labels(*labels).observe(step_seconds)

    def job_epoch_evaluated(
        self, job_id: str, strategy: str, *, loss: float, accuracy: float
    ) -> None:
        self._track(job_id, strategy)
        self.eval_loss.labels(job_id, strategy).set(loss)
        self.eval_accuracy.labels(job_id, strategy).set(accuracy)

    def job_checkpoint_saved(self, job_id: str, strategy: str, seconds: float) -> None:
        self._track(job_id, strategy)
        self.checkpoint_save_duration.labels(job_id, strategy).observe(seconds)

    def job_gpu_memory(
        self, job_id: str, strategy: str, device: str, bytes_in_use: int, peak_bytes: int
    ) -> None:
        """One device's memory at an epoch's end: in use then, and the epoch's peak."""
        self._track(job_id, strategy, device)
        self.gpu_memory_in_use.labels(job_id, strategy, device).set(bytes_in_use)
        self.gpu_memory_peak.labels(job_id, strategy, device).set(peak_bytes)

    def job_preempted(self, job_id: str, strategy: str) -> None:
        self._track(job_id, strategy)
        self.job_preemptions.labels(job_id, strategy).inc()

    def job_finished(self, job_id: str, outcome: str, duration_seconds: float) -> None:
        """Count the outcome and start the retention window of the job's series.

        outcome: "succeeded", "failed" or "canceled".
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        self.jobs_finished.labels(outcome).inc()
        self.job_duration.observe(duration_seconds)
        with self._lock:
            series = self._jobs.get(job_id)
            if series is None:  # never trained (canceled while queued): nothing to remove
                return
            series.expires_at = self._clock() + self.retention_seconds
            strategies = tuple(series.strategies)
        for strategy in strategies:
            self.train_running.labels(job_id, strategy).set(0)

    def remove_expired_job_series(self) -> int:
        """Remove the series of jobs whose retention window has passed; returns how many jobs."""
        now = self._clock()
        with self._lock:
            expired = [
                (job_id, self._jobs.pop(job_id))
                for job_id, series in list(self._jobs.items())
                if series.expires_at is not None and series.expires_at <= now
            ]
        for job_id, series in expired:
            for strategy in series.strategies:
                for metric in self._job_metrics:
                    metric.remove(job_id, strategy)
            for strategy, device in series.gpu_devices:
                self.gpu_memory_in_use.remove(job_id, strategy, device)
                self.gpu_memory_peak.remove(job_id, strategy, device)
        return len(expired)

    def _track(self, job_id: str, strategy: str, device: str | None = None) -> None:
        with self._lock:
            series = self._jobs.get(job_id)
            if series is None:
                series = self._jobs[job_id] = _JobSeries()
            series.strategies.add(strategy)
            if device is not None:
                series.gpu_devices.add((strategy, device))
