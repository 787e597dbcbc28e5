"""Service metrics: names, units, labels, and the retention of per-job series."""

import re
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from service.api.grpc_metrics import MetricsServerInterceptor
from service.metrics import ServiceMetrics
from service.metrics_http import start_metrics_server
from service.protocol import JobState


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def metrics(clock):
    return ServiceMetrics(CollectorRegistry(), job_series_retention_seconds=60, clock=clock)


def _progress(metrics, job_id, **overrides):
    values = dict(epoch=1, batches=10, examples=1280, loss=0.5, accuracy=0.9,
                  examples_per_second=5000.0, step_seconds=0.002)  # fmt: skip
    values.update(overrides)
    metrics.job_progress(job_id, "cpu", **values)


def test_progress_increments_counters_and_sets_gauges(metrics):
    _progress(metrics, "job-a")
    _progress(metrics, "job-a", batches=5, examples=640, loss=0.25, epoch=2)
    value = metrics.registry.get_sample_value
    labels = {"job_id": "job-a", "strategy": "cpu"}
    assert value("ntrain_train_batches_total", labels) == 15
    assert value("ntrain_train_examples_total", labels) == 1920
    assert value("ntrain_train_loss", labels) == 0.25
    assert value("ntrain_train_epoch", labels) == 2
    assert value("ntrain_train_accuracy_ratio", labels) == 0.9
    assert value("ntrain_train_examples_per_second", labels) == 5000
    assert value("ntrain_train_step_duration_seconds_count", labels) == 2
    assert value("ntrain_train_step_duration_seconds_bucket", {**labels, "le": "0.002"}) == 2


def test_epoch_checkpoint_and_gpu_memory_series(metrics):
    metrics.job_epoch_evaluated("job-a", "mirrored", loss=0.1, accuracy=0.97)
    metrics.job_checkpoint_saved("job-a", "mirrored", 0.3)
    metrics.job_gpu_memory("job-a", "mirrored", "GPU:0", 1 << 30, 3 << 30)
    value = metrics.registry.get_sample_value
    labels = {"job_id": "job-a", "strategy": "mirrored"}
    assert value("ntrain_eval_accuracy_ratio", labels) == 0.97
    assert value("ntrain_eval_loss", labels) == 0.1
    assert value("ntrain_checkpoint_save_duration_seconds_sum", labels) == pytest.approx(0.3)
    assert value("ntrain_gpu_memory_in_use_bytes", {**labels, "device": "GPU:0"}) == 1 << 30
    assert value("ntrain_gpu_memory_peak_bytes", {**labels, "device": "GPU:0"}) == 3 << 30


def test_service_series(metrics):
    metrics.set_jobs_by_state({JobState.RUNNING: 2, JobState.QUEUED: 1})
    metrics.set_queue_length(1)
    metrics.set_warm_workers(1)
    metrics.set_devices({"GPU": 4, "CPU": 1})
    metrics.set_build_info(version="0.1.0", tensorflow_version="2.21.0", python_version="3.11")
    metrics.job_first_step("job-a", 0.8)
    metrics.job_finished("job-a", "succeeded", 42.0)
    value = metrics.registry.get_sample_value
    assert value("ntrain_jobs", {"state": "RUNNING"}) == 2
    assert all(value("ntrain_jobs", {"state": s}) is not None for s in JobState.__members__)
    assert value("ntrain_jobs", {"state": "FAILED"}) == 0
    assert value("ntrain_queue_length") == 1 and value("ntrain_warm_workers") == 1
    assert value("ntrain_devices", {"type": "GPU"}) == 4
    build = {"version": "0.1.0", "tensorflow_version": "2.21.0", "python_version": "3.11"}
    assert value("ntrain_build_info", build) == 1
    assert value("ntrain_submit_to_first_step_seconds_count") == 1
    assert value("ntrain_jobs_finished_total", {"outcome": "succeeded"}) == 1
    assert value("ntrain_jobs_finished_total", {"outcome": "failed"}) == 0
    assert value("ntrain_job_duration_seconds_sum") == 42


def test_mlflow_log_failures_count_from_zero(metrics):
    value = metrics.registry.get_sample_value
    assert value("ntrain_mlflow_log_failures_total") == 0  # exposed before the first failure
    metrics.mlflow_log_failed()
    metrics.mlflow_log_failed()
    assert value("ntrain_mlflow_log_failures_total") == 2


def test_per_job_series_disappear_after_the_retention_window(metrics, clock):
    _progress(metrics, "old")
    metrics.job_epoch_evaluated("old", "cpu", loss=0.1, accuracy=0.9)
    _progress(metrics, "live")
    metrics.job_finished("old", "failed", 5.0)
    value = metrics.registry.get_sample_value
    old = {"job_id": "old", "strategy": "cpu"}
    clock.now += 59
    assert metrics.remove_expired_job_series() == 0
    assert value("ntrain_train_batches_total", old) == 10
    clock.now += 1
    # Collecting (a scrape) removes them too; the call is explicit here.
    assert metrics.remove_expired_job_series() == 1
    for name in ("ntrain_train_batches_total", "ntrain_train_loss", "ntrain_eval_accuracy_ratio",
                 "ntrain_train_step_duration_seconds_count"):  # fmt: skip
        assert value(name, old) is None, name
    assert value("ntrain_train_batches_total", {"job_id": "live", "strategy": "cpu"}) == 10
    # Service-wide series stay.
    assert value("ntrain_jobs_finished_total", {"outcome": "failed"}) == 1


def test_a_scrape_removes_expired_series(metrics, clock):
    _progress(metrics, "old")
    metrics.job_finished("old", "canceled", 1.0)
    clock.now += 61
    names = {s.labels.get("job_id") for m in metrics.registry.collect() for s in m.samples}
    assert "old" not in names


def _every_series(metrics):
    """Touch every hook, so every family has samples."""
    _progress(metrics, "job-a")
    metrics.job_epoch_evaluated("job-a", "cpu", loss=0.1, accuracy=0.9)
    metrics.job_checkpoint_saved("job-a", "cpu", 0.1)
    metrics.job_gpu_memory("job-a", "cpu", "GPU:0", 1024, 2048)
    metrics.job_first_step("job-a", 1.0)
    metrics.set_build_info(version="0.1.0", tensorflow_version="2.21.0", python_version="3.11")
    metrics.set_devices({"CPU": 1})
    metrics.set_warm_workers(1)
    metrics.set_queue_length(0)
    metrics.job_finished("job-a", "succeeded", 1.0)


def test_names_follow_the_prometheus_conventions(metrics):
    """Over the whole registry the server exposes, the gRPC interceptor's series included."""
    MetricsServerInterceptor(metrics.registry)
    _every_series(metrics)
    families = list(metrics.registry.collect())
    assert len(families) >= 22
    for family in families:
        name = family.name
        # Ours carry one prefix; the gRPC exporters' and the standard collectors' keep theirs.
        assert name.startswith(("ntrain_", "grpc_server_", "process_", "python_")), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        if "accuracy" in name:  # a fraction of 1, so its unit is a ratio
            assert name.endswith("_ratio"), name
        if family.type == "counter":
            assert all(s.name == f"{name}_total" for s in family.samples), name
        else:
            assert not name.endswith("_total"), name
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
        if re.search(r"duration|time|latency|memory|size", name):
            assert name.endswith(("_seconds", "_bytes")), f"{name} needs a base unit"
        assert not re.search(r"_(ms|milliseconds|minutes|hours|kb|mb|gb|percent)(_|$)", name)
        labels = {key for sample in family.samples for key in sample.labels} - {"le"}
        if "job_id" in labels:  # only the live-training series, which retention bounds
            assert name.startswith(
                ("ntrain_train_", "ntrain_eval_", "ntrain_checkpoint_", "ntrain_gpu_")
            ), name
            assert labels >= {"job_id", "strategy"}, name


def test_the_standard_process_and_python_collectors_are_in_the_registry(metrics):
    value = metrics.registry.get_sample_value
    assert value("process_resident_memory_bytes") > 0
    assert value("process_cpu_seconds_total") >= 0
    assert value("process_open_fds") > 0 and value("process_max_fds") > 0
    assert value("python_gc_collections_total", {"generation": "0"}) >= 0
    (info,) = [f for f in metrics.registry.collect() if f.name == "python_info"]
    assert info.samples[0].labels["implementation"] == "CPython"
    # A second server's registry (tests make many) has its own collectors.
    other = ServiceMetrics(CollectorRegistry())
    assert other.registry.get_sample_value("process_resident_memory_bytes") > 0


def test_every_state_outcome_and_device_type_is_exposed_from_the_start(metrics):
    value = metrics.registry.get_sample_value
    assert [value("ntrain_jobs", {"state": s}) for s in JobState.__members__] == [0] * len(JobState)
    for outcome in ("succeeded", "failed", "canceled"):
        assert value("ntrain_jobs_finished_total", {"outcome": outcome}) == 0
    assert value("ntrain_devices", {"type": "GPU"}) == 0
    metrics.set_jobs_by_state({JobState.RUNNING: 1})
    metrics.set_jobs_by_state({JobState.QUEUED: 2})
    assert value("ntrain_jobs", {"state": "RUNNING"}) == 0
    assert value("ntrain_jobs", {"state": "QUEUED"}) == 2


def test_running_gauge_tells_live_jobs_from_finished_ones(metrics):
    """The stalled-job alert needs it: a finished job's batch counter stops moving too."""
    _progress(metrics, "job-a")
    labels = {"job_id": "job-a", "strategy": "cpu"}
    assert metrics.registry.get_sample_value("ntrain_train_running", labels) == 1
    metrics.job_finished("job-a", "succeeded", 3.0)
    assert metrics.registry.get_sample_value("ntrain_train_running", labels) == 0


def test_gpu_memory_series_go_with_the_job(metrics, clock):
    metrics.job_gpu_memory("job-g", "mirrored", "GPU:0", 100, 150)
    metrics.job_gpu_memory("job-g", "mirrored", "GPU:1", 200, 250)
    metrics.job_finished("job-g", "failed", 2.0)
    clock.now += 60
    assert metrics.remove_expired_job_series() == 1
    for device in ("GPU:0", "GPU:1"):
        labels = {"job_id": "job-g", "strategy": "mirrored", "device": device}
        for name in ("ntrain_gpu_memory_in_use_bytes", "ntrain_gpu_memory_peak_bytes"):
            assert metrics.registry.get_sample_value(name, labels) is None


def test_a_job_canceled_while_queued_has_no_series_to_remove(metrics, clock):
    metrics.job_finished("never-ran", "canceled", 0.0)
    clock.now += 600
    assert metrics.remove_expired_job_series() == 0
    assert metrics.registry.get_sample_value("ntrain_jobs_finished_total",
                                             {"outcome": "canceled"}) == 1  # fmt: skip


def test_the_endpoint_serves_the_registry_and_frees_its_port(metrics):
    _progress(metrics, "job-a")
    server, port = start_metrics_server(0, "127.0.0.1", metrics.registry)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    finally:
        server.shutdown()
    assert 'ntrain_train_batches_total{job_id="job-a",strategy="cpu"} 10.0' in text
    assert "ntrain_jobs{" in text
    with socket.socket() as probe:  # nothing listens on the port any more
        # SO_REUSEADDR as every server sets it: it allows TIME_WAIT connections, not a listener.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


def test_unknown_outcome_is_refused(metrics):
    with pytest.raises(ValueError, match="outcome"):
        metrics.job_finished("job-a", "exploded", 1.0)
