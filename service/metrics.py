"""Prometheus metrics of the training service.

One prefix (`ntrain_`), base units, `_total` on counters, histograms for
durations. Series labelled with a `job_id` exist only for recent jobs: they are
removed `job_series_retention_seconds` after the job ends, so the number of
series is bounded by recent jobs, not by every job ever run.

Every metric lives in the `registry` given to `ServiceMetrics`, so tests use a
fresh `CollectorRegistry` and read values with `get_sample_value`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

# The `_created` series client_python adds to every counter and histogram would
# double the per-job series for a timestamp nobody graphs.
disable_created_metrics()

JOB_STATES = ("QUEUED", "STARTING", "RUNNING", "CANCELLING", "SUCCEEDED", "FAILED", "CANCELED")
OUTCOMES = ("succeeded", "failed", "canceled")
JOB_LABELS = ("job_id", "strategy")

# Mean step time of a compiled call: from sub-millisecond CPU steps to slow GPUs' first calls.
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CHECKPOINT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FIRST_STEP_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
JOB_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)


class _ExpireOnScrape(Collector):
    """Drops expired per-job series whenever the registry is collected."""

    def __init__(self, metrics: ServiceMetrics):
        self._metrics = metrics

    def collect(self):
        self._metrics.remove_expired_job_series()
        return []


class ServiceMetrics:
    """Every metric of the service, and the hooks the job manager calls.

    Args:
        registry: where the metrics live; a fresh one when None.
        job_series_retention_seconds: how long a job's own series outlive it.
        clock: monotonic seconds; tests pass a fake one.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        job_series_retention_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.retention_seconds = job_series_retention_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # job_id -> (metric, label values) of every series it has, and when it ended.
        self._job_series: dict[str, set[tuple[MetricWrapperBase, tuple[str, ...]]]] = {}
        self._ended: dict[str, float] = {}
        # Registered first, so expired series are gone before the others are collected.
        self.registry.register(_ExpireOnScrape(self))
        r = self.registry

        # Training, per running job.
        self.train_batches = Counter(
            "ntrain_train_batches", "Training steps (batches) run.", JOB_LABELS, registry=r
        )
        self.train_examples = Counter(
            "ntrain_train_examples", "Training examples processed.", JOB_LABELS, registry=r
        )
        self.train_loss = Gauge(
            "ntrain_train_loss", "Mean training loss over the epoch so far.", JOB_LABELS,
            registry=r,
        )  # fmt: skip
        self.train_accuracy = Gauge(
            "ntrain_train_accuracy", "Training accuracy over the epoch so far (0-1).",
            JOB_LABELS, registry=r,
        )  # fmt: skip
        self.train_epoch = Gauge(
            "ntrain_train_epoch", "Epoch being trained (1-based).", JOB_LABELS, registry=r
        )
        self.train_examples_per_second = Gauge(
            "ntrain_train_examples_per_second", "Training throughput of the last compiled call.",
            JOB_LABELS, registry=r,
        )  # fmt: skip
        self.train_step_duration = Histogram(
            "ntrain_train_step_duration_seconds",
            "Mean step duration of each compiled call (one observation per call).",
            JOB_LABELS, buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.eval_loss = Gauge(
            "ntrain_eval_loss", "Test loss at the end of the last epoch.", JOB_LABELS, registry=r
        )
        self.eval_accuracy = Gauge(
            "ntrain_eval_accuracy", "Test accuracy at the end of the last epoch (0-1).",
            JOB_LABELS, registry=r,
        )  # fmt: skip
        self.checkpoint_save_duration = Histogram(
            "ntrain_checkpoint_save_duration_seconds", "Time to save a checkpoint.",
            JOB_LABELS, buckets=CHECKPOINT_BUCKETS, registry=r,
        )  # fmt: skip
        self.gpu_memory = Gauge(
            "ntrain_gpu_memory_in_use_bytes", "GPU memory TensorFlow reports in use.",
            (*JOB_LABELS, "device"), registry=r,
        )  # fmt: skip

        # The service.
        self.jobs = Gauge("ntrain_jobs", "Jobs by state.", ("state",), registry=r)
        self.jobs_finished = Counter(
            "ntrain_jobs_finished", "Jobs that ended, by outcome.", ("outcome",), registry=r
        )
        self.job_duration = Histogram(
            "ntrain_job_duration_seconds", "Run time of ended jobs, from start to end.",
            buckets=JOB_DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_length = Gauge("ntrain_queue_length", "Jobs waiting to run.", registry=r)
        self.submit_to_first_step = Histogram(
            "ntrain_submit_to_first_step_seconds",
            "Time from SubmitJob to the job's first progress report.",
            buckets=FIRST_STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.devices = Gauge("ntrain_devices", "Devices found, by type.", ("type",), registry=r)
        self.warm_workers = Gauge(
            "ntrain_warm_workers", "Worker processes with TensorFlow imported, ready.", registry=r
        )
        self.build = Info("ntrain_build", "Versions of the running server.", registry=r)

        for state in JOB_STATES:
            self.jobs.labels(state).set(0)
        for outcome in OUTCOMES:
            self.jobs_finished.labels(outcome)

    # -- service-wide ------------------------------------------------------

    def set_build_info(self, *, version: str, tensorflow_version: str, python_version: str):
        self.build.info(
            {
                "version": version,
                "tensorflow_version": tensorflow_version,
                "python_version": python_version,
            }
        )

    def set_devices(self, counts: Mapping[str, int]) -> None:
        for kind, count in counts.items():
            self.devices.labels(kind).set(count)

    def set_warm_workers(self, ready: int) -> None:
        self.warm_workers.set(ready)

    def set_queue_length(self, length: int) -> None:
        self.queue_length.set(length)

    def set_jobs_by_state(self, counts: Mapping[str, int]) -> None:
        """Counts of jobs per state; states not named are set to 0."""
        for state in JOB_STATES:
            self.jobs.labels(state).set(counts.get(state, 0))

    # -- per job -------------------------------------------------------------

    def _series(self, metric: MetricWrapperBase, job_id: str, *labels: str):
        """The child of `metric` for this job, remembered so it can be removed later."""
        values = (job_id, *labels)
        with self._lock:
            self._job_series.setdefault(job_id, set()).add((metric, values))
        return metric.labels(*values)

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
        """One compiled call's report: `batches` and `examples` are its increments."""
        self._series(self.train_batches, job_id, strategy).inc(batches)
        self._series(self.train_examples, job_id, strategy).inc(examples)
        self._series(self.train_loss, job_id, strategy).set(loss)
        self._series(self.train_accuracy, job_id, strategy).set(accuracy)
        self._series(self.train_epoch, job_id, strategy).set(epoch)
        self._series(self.train_examples_per_second, job_id, strategy).set(examples_per_second)
        self._series(self.train_step_duration, job_id, strategy).observe(step_seconds)

    def job_epoch_evaluated(self, job_id: str, strategy: str, *, loss: float, accuracy: float):
        self._series(self.eval_loss, job_id, strategy).set(loss)
        self._series(self.eval_accuracy, job_id, strategy).set(accuracy)

    def job_checkpoint_saved(self, job_id: str, strategy: str, seconds: float) -> None:
        self._series(self.checkpoint_save_duration, job_id, strategy).observe(seconds)

    def job_gpu_memory(self, job_id: str, strategy: str, device: str, bytes_in_use: int) -> None:
        self._series(self.gpu_memory, job_id, strategy, device).set(bytes_in_use)

    def job_finished(self, job_id: str, outcome: str, duration_seconds: float) -> None:
        """Count the outcome and start the job's retention window."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        self.jobs_finished.labels(outcome).inc()
        self.job_duration.observe(duration_seconds)
        with self._lock:
            self._ended[job_id] = self._clock()

    def remove_expired_job_series(self) -> int:
        """Remove the series of jobs that ended over the retention window ago."""
        now = self._clock()
        with self._lock:
            expired = [j for j, end in self._ended.items() if now - end >= self.retention_seconds]
            series = [s for job_id in expired for s in self._job_series.pop(job_id, ())]
            for job_id in expired:
                del self._ended[job_id]
        for metric, values in series:
            try:
                metric.remove(*values)
            except KeyError:  # never observed, or already removed
                pass
        return len(expired)


def start_metrics_server(
    port: int, address: str, registry: CollectorRegistry
) -> tuple[WSGIServer, int]:
    """Serve /metrics over HTTP on a daemon thread; port 0 picks a free port.

    Returns:
        The server (call `shutdown()` to stop it) and the port it listens on.
    """
    server, _thread = _start_http_server(port, addr=address, registry=registry)
    return server, server.server_port
