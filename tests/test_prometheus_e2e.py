"""A real Prometheus scrapes a real `ntrain serve` during a real training job.

The server runs in a subprocess on loopback with free ports, its metrics
endpoint secured as in the compose stack (TLS and basic auth, with secrets made
by deploy/make-certs.sh); Prometheus (Debian's binary) scrapes it every second
with the stack's own scrape job (only the target and the secrets' paths
changed) and the repository's alert rules loaded. A training job on the
synthetic data set runs until Prometheus has seen its batch counter move, an
epoch evaluated and a checkpoint saved; then it is canceled. The test asserts
through Prometheus's HTTP API that the training series exist, that batches
increase and that the loss is finite, and runs every query of the Grafana
dashboard, which must return data.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import require_tool
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc
from test_deploy import (
    PROMETHEUS,
    SECRETS_DIR,
    dashboard_queries,
    scrape_job,
    secret_files,
    substitute_variables,
)
from tls_harness import run_make_certs

from ntrain.client.states import state_name

START_SECONDS = 120  # the server probes devices and imports TensorFlow in child processes
TRAIN_SECONDS = 120
STOP_SECONDS = 20
SCRAPE = "1s"
RATE_INTERVAL = "10s"  # what $__rate_interval becomes: enough 1 s scrapes for rate()
# Queries that can only return data on a host with GPUs (TensorFlow reports
# memory for GPUs only); on a CPU-only host they must still run without error.
GPU_ONLY_METRICS = ("ntrain_gpu_memory_in_use_bytes", "ntrain_gpu_memory_peak_bytes")
# Series that exist only while an experiment runs (each is its experiment's): the
# test runs a job, not an experiment. tests/test_experiments.py reads them live.
EXPERIMENT_ONLY_METRICS = ("ntrain_experiment_trials", "ntrain_experiment_best_metric")

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(what: str, check: Callable[[], Any], seconds: float, interval: float = 0.25):
    """Poll `check` until it returns a truthy value; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(interval)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Prometheus:
    """Prometheus's HTTP API."""

    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: Any) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as error:
            pytest.fail(f"{path} {params}: HTTP {error.code}: {error.read().decode()[:500]}")
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def query_range(self, expr: str, start: float, end: float) -> list[dict]:
        return self.get("/api/v1/query_range", query=expr, start=start, end=end, step=SCRAPE)[
            "result"
        ]


@pytest.fixture
def secrets(tmp_path) -> Path:
    """What `make certs` makes for the compose stack."""
    directory = tmp_path / "secrets"
    run_make_certs(directory)
    return directory


@pytest.fixture
def server(tmp_path, secrets):
    """`ntrain serve` in a subprocess on free loopback ports: (gRPC port, metrics port, log).

    Its metrics endpoint takes the stack's TLS certificate and basic-auth users.
    """
    state = tmp_path / "state"
    state.mkdir()
    log_path = tmp_path / "server.log"
    port_file = tmp_path / "server.port"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    command = [
        sys.executable, "-m", "service.cli", "serve", "--bind", "127.0.0.1",
        "--port", "0", "--metrics-port", "0", "--state-dir", str(state),
        "--port-file", str(port_file),
        "--metrics-tls-cert", str(secrets / "server.crt"),
        "--metrics-tls-key", str(secrets / "server.key"),
        "--metrics-basic-auth", str(secrets / "metrics-users"),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:

        def started():
            assert process.poll() is None, f"ntrain serve exited:\n{log_path.read_text()}"
            ready = re.search(
                r"metrics on https://127\.0\.0\.1:(\d+)/metrics", log_path.read_text()
            )
            return port_file.exists() and ready and (int(port_file.read_text()), int(ready[1]))

        port, metrics_port = _wait_for("ntrain serve to start", started, START_SECONDS)
        yield port, metrics_port, log_path
    finally:
        _stop(process)


def _on_this_host(value: Any, files: dict[str, Path]) -> Any:
    """A scrape config with each /run/secrets/ path replaced by the file compose mounts there."""
    if isinstance(value, dict):
        return {key: _on_this_host(item, files) for key, item in value.items()}
    if isinstance(value, list):
        return [_on_this_host(item, files) for item in value]
    if isinstance(value, str) and value.startswith(SECRETS_DIR):
        return str(files[value])
    return value


@pytest.fixture
def prometheus(server, secrets, tmp_path):
    """A real Prometheus scraping the server every second, with deploy/'s job and alert rules.

    A second job scrapes the same endpoint without the password: it must see it down.
    """
    binary = require_tool("prometheus")
    _, metrics_port, _ = server
    targets = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    stack = _on_this_host(scrape_job("ntrain"), secret_files(secrets))
    without_password = {key: value for key, value in stack.items() if key != "basic_auth"}
    config = {
        "global": {"scrape_interval": SCRAPE, "evaluation_interval": SCRAPE},
        "rule_files": [str(PROMETHEUS / "alerts.yml")],
        "scrape_configs": [
            {**stack, "static_configs": targets},
            {**without_password, "job_name": "no_password", "static_configs": targets},
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    for _attempt in range(3):  # another process may take the free port before Prometheus does
        started = _start_prometheus(binary, config_path, tmp_path)
        if started is not None:
            break
    else:
        pytest.fail(f"Prometheus did not start:\n{(tmp_path / 'prometheus.log').read_text()}")
    process, api = started
    try:
        yield api
    finally:
        _stop(process)


def _start_prometheus(binary: str, config: Path, tmp_path: Path):
    """(process, api) of a ready Prometheus on a free port, or None when it exited."""
    port = _free_port()
    with open(tmp_path / "prometheus.log", "ab") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api = Prometheus(port)
    try:
        _wait_for("Prometheus to start", lambda: process.poll() is not None or api.ready(), 30)
    except BaseException:
        _stop(process)
        raise
    return (process, api) if process.poll() is None else None


def _job_spec() -> pb.JobSpec:
    """Long enough to outlast the assertions; canceled once they hold."""
    return pb.JobSpec(
        layers=[
            pb.LayerSpec(units=64, activation="relu"),
            pb.LayerSpec(units=10, activation="softmax"),
        ],
        initializer="glorot",
        optimizer=pb.OptimizerSpec(name="rmsprop", learning_rate=1e-3),
        batch_size=64,
        epochs=10_000,
        dataset="synthetic",
        strategy=pb.StrategySpec(name="cpu"),
        steps_per_execution=4,  # several progress reports, so several scrapes, per epoch
        checkpoint_every_epochs=5,
        seed=1,
    )


def test_prometheus_scrapes_training_and_every_dashboard_query_returns_data(server, prometheus):
    port, _, server_log = server
    started = time.time()
    _wait_for(
        "Prometheus to scrape the server", lambda: prometheus.value('up{job="ntrain"}') == 1, 30
    )
    # The same endpoint without the password answers 401: down, not scraped.
    _wait_for(
        "the scrape without a password to fail",
        lambda: prometheus.value('up{job="no_password"}') == 0,
        30,
    )
    (target,) = [
        t for t in prometheus.get("/api/v1/targets")["activeTargets"]
        if t["labels"]["job"] == "no_password"
    ]  # fmt: skip
    assert "401" in target["lastError"], target

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        job = stub.SubmitJob(pb.SubmitJobRequest(spec=_job_spec()), timeout=30)
        with pytest.raises(grpc.RpcError) as missing:  # an error for the error panels
            stub.GetJob(pb.GetJobRequest(job_id="no-such-job"), timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        selector = f'job="ntrain", job_id="{job.job_id}"'

        def seen_training():
            state = stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=10).state
            assert state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_STARTING, pb.JOB_STATE_RUNNING), (
                f"the job ended early ({state_name(state)}); server log:\n"
                + server_log.read_text()[-3000:]
            )
            batches = prometheus.query_range(
                f"ntrain_train_batches_total{{{selector}}}", started, time.time()
            )
            distinct = {float(v) for series in batches for _, v in series["values"]}
            checkpoints = prometheus.value(
                f"ntrain_checkpoint_save_duration_seconds_count{{{selector}}}"
            )
            evaluated = prometheus.value(f"ntrain_eval_loss{{{selector}}}")
            return len(distinct) >= 3 and checkpoints and evaluated is not None

        _wait_for(
            "Prometheus to see the job train", seen_training, START_SECONDS + TRAIN_SECONDS, 1
        )

        # The training series, through Prometheus.
        end = time.time()
        (batches,) = prometheus.query_range(
            f"ntrain_train_batches_total{{{selector}}}", started, end
        )
        assert batches["metric"]["strategy"] == "cpu"
        values = [float(v) for _, v in batches["values"]]
        assert values == sorted(values) and values[-1] > values[0] > 0, values
        for name in ("ntrain_train_loss", "ntrain_eval_loss", "ntrain_train_accuracy_ratio"):
            (series,) = prometheus.query_range(f"{name}{{{selector}}}", started, end)
            assert all(math.isfinite(float(v)) for _, v in series["values"]), (name, series)
        assert prometheus.value(f"ntrain_train_running{{{selector}}}") == 1
        assert prometheus.value(f"ntrain_train_epoch{{{selector}}}") >= 1
        assert prometheus.value(f"ntrain_train_examples_total{{{selector}}}") > 0
        assert prometheus.value(f"ntrain_train_examples_per_second{{{selector}}}") > 0
        assert prometheus.value('ntrain_jobs{state="RUNNING"}') == 1
        assert prometheus.value("ntrain_submit_to_first_step_seconds_count") == 1

        canceled = stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=60)
        assert canceled.state == pb.JOB_STATE_CANCELED, state_name(canceled.state)

    _wait_for(
        "Prometheus to see the job end",
        lambda: (
            prometheus.value(f"ntrain_train_running{{{selector}}}") == 0
            and prometheus.value('ntrain_jobs_finished_total{outcome="canceled"}') == 1
            and prometheus.value("ntrain_job_duration_seconds_count") == 1
        ),
        30,
    )
    time.sleep(2)  # two more scrapes, so the rates after the end have their samples too
    end = time.time()

    # The dashboard's job variable lists the job.
    job_ids = prometheus.get(
        "/api/v1/label/job_id/values", **{"match[]": "ntrain_train_batches_total"}
    )
    assert job.job_id in job_ids

    # Every query of every panel, as Grafana would send it: a range query over the
    # test's time range, or an instant one at its end (the stat panels). Panels that
    # show failures have data too: the NOT_FOUND above is an error for "Errors per
    # second", the cancel an outcome, and ntrain_mlflow_log_failures_total (no labels)
    # reads 0 from the start, as preemptions do (or vector(0)). Only GPU memory has none
    # on a host without GPUs, and the experiment panels none without an experiment,
    # where their queries must still run without error.
    gpus = prometheus.value('ntrain_devices{type="GPU"}')
    empty = []
    for job_filter in (".*", job.job_id):
        for title, target in dashboard_queries():
            expr = target["expr"]
            query = substitute_variables(expr, rate_interval=RATE_INTERVAL, job_id=job_filter)
            if target.get("instant"):
                values = [
                    s["value"][1]
                    for s in prometheus.get("/api/v1/query", query=query, time=end)["result"]
                ]
            else:
                result = prometheus.query_range(query, started, end)
                values = [v for s in result for _, v in s["values"]]
            has_data = any(not math.isnan(float(v)) for v in values)
            if has_data or any(m in expr for m in EXPERIMENT_ONLY_METRICS):
                continue
            if not (gpus == 0 and any(m in expr for m in GPU_ONLY_METRICS)):
                empty.append(f"{title}: {query}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

    # The alert rules evaluate cleanly on live data, and none fires for a healthy job.
    rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
    assert rules and all(r["health"] == "ok" for r in rules), rules
    firing = {a["labels"]["alertname"] for a in prometheus.get("/api/v1/alerts")["alerts"]}
    assert not firing & {"NtrainDown", "NtrainLossNotFinite", "NtrainJobStalled"}, firing
