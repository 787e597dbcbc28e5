"""The ntrain command line against a real server.

The server is `ntrain serve --port 0` in a child process (so `serve` itself is
tested too); client commands run in this process through `service.cli.app.main`, on the
synthetic data set. Each failure must be one line on stderr with status 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO_ROOT, SHARED_MNIST

from naive_model.data import synthetic_dataset, to_features
from service.cli import exit_status as cli_errors
from service.cli.app import main as cli_main
from service.cli.local_server import LocalServer

pytestmark = pytest.mark.slow

SMALL_JOB = ["--dataset", "synthetic", "--layers", "64:relu,10:softmax", "--strategy", "cpu"]


def run_cli(*argv: str) -> SimpleNamespace:
    """Run one ntrain command in this process; its status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(list(argv))
    return SimpleNamespace(status=status, out=out.getvalue(), err=err.getvalue())


def one_error_line(result: SimpleNamespace) -> str:
    assert result.status == cli_errors.EXIT_ERROR, result
    assert result.err.count("\n") == 1 and "Traceback" not in result.err, result.err
    return result.err.strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LocalServer(tmp_path_factory.mktemp("state"), ["--no-metrics"]) as running:
        yield running


@pytest.fixture(scope="module")
def finished_job(server) -> str:
    """A job submitted with --detach and followed to SUCCEEDED with watch."""
    submitted = run_cli(
        "train", "--detach", "--epochs", "1", *SMALL_JOB, "--address", server.address
    )
    assert submitted.status == cli_errors.EXIT_OK, submitted.err
    job_id = submitted.out.strip()
    assert job_id and "\n" not in job_id  # --detach prints the job id alone, for scripts
    watched = run_cli("watch", job_id, "--address", server.address)
    assert watched.status == cli_errors.EXIT_OK, watched.err
    assert "SUCCEEDED" in watched.out and "result: test accuracy" in watched.out
    return job_id


def test_health_reports_serving_through_the_installed_command(server):
    ntrain = shutil.which("ntrain", path=str(Path(sys.executable).parent))
    command = [ntrain] if ntrain else [sys.executable, "-m", "service.cli"]
    result = subprocess.run(
        [*command, "health", "--address", server.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "SERVING\n", "")


def test_info_shows_versions_and_devices(server):
    text = run_cli("info", "--address", server.address)
    assert text.status == cli_errors.EXIT_OK
    assert text.out.startswith("version ") and "CPU:0" in text.out
    info = json.loads(run_cli("info", "--json", "--address", server.address).out)
    assert info["version"] and any(device["kind"] == "CPU" for device in info["devices"])
    assert "cpu" in info["strategies"]


def test_train_follows_the_job_with_progress_to_success(server):
    result = run_cli(
        "train", "--epochs", "2", "--steps-per-execution", "4", *SMALL_JOB,
        "--address", server.address,
    )  # fmt: skip
    assert result.status == cli_errors.EXIT_OK, result.err
    out = result.out
    assert out.startswith("job ") and "submitted: 64:relu,10:softmax on synthetic" in out
    for text in ("RUNNING", "SUCCEEDED", "epoch 1/2 done in", "epoch 2/2 done in"):
        assert text in out
    # Output is not a TTY here: plain lines, no carriage returns or escapes.
    assert "\r" not in out and "\x1b" not in out
    assert any(line.startswith("epoch 1/2 step ") for line in out.splitlines())
    assert "result: test accuracy" in out


def test_jobs_lists_the_job_and_filters_by_state(server, finished_job):
    table = run_cli("jobs", "--address", server.address)
    assert table.status == cli_errors.EXIT_OK
    header, *rows = table.out.splitlines()
    assert header.split()[:2] == ["JOB", "STATE"]
    assert any(row.split()[:2] == [finished_job, "SUCCEEDED"] for row in rows)
    listed = json.loads(
        run_cli("jobs", "--state", "succeeded", "--json", "--address", server.address).out
    )
    assert finished_job in [job["job_id"] for job in listed]
    # --json is the proto3 JSON mapping: enum values by their full names.
    assert {job["state"] for job in listed} == {"JOB_STATE_SUCCEEDED"}
    assert (
        len(json.loads(run_cli("jobs", "--limit", "1", "--json", "--address", server.address).out))
        == 1
    )
    none = run_cli("jobs", "--state", "CANCELLING", "--address", server.address)
    assert none.out == "no jobs\n"


def test_eval_and_predict_agree_on_the_synthetic_test_split(server, finished_job, tmp_path):
    evaluated = run_cli("eval", finished_job, "--json", "--address", server.address)
    assert evaluated.status == cli_errors.EXIT_OK, evaluated.err
    evaluation = json.loads(evaluated.out)
    assert evaluation["dataset"] == "synthetic" and int(evaluation["examples"]) == 512

    test = synthetic_dataset()
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=test.x_test, y=test.y_test)
    predicted = run_cli(
        "predict", finished_job, "--input", str(inputs), "--address", server.address
    )
    assert predicted.status == cli_errors.EXIT_OK, predicted.err
    *table, summary = predicted.out.splitlines()
    assert table[0].split() == ["#", "PREDICTED", "PROBABILITY", "LABEL"]
    assert len(table) == 1 + 512  # sent in chunks; every input answered, in order
    right = int(summary.split("/")[0])
    assert summary.endswith("right (" + f"{100 * right / 512:.2f}%)")
    assert right / 512 == pytest.approx(evaluation["accuracy"], abs=1e-6)


def test_predict_shows_mnist_test_images_as_ascii_art(server, finished_job):
    if not SHARED_MNIST.exists():
        pytest.skip("no MNIST beside the repository")
    result = run_cli(
        "predict", finished_job, "--mnist-test", "2", "--mnist-file", str(SHARED_MNIST),
        "--show", "--address", server.address,
    )  # fmt: skip
    assert result.status == cli_errors.EXIT_OK, result.err
    assert result.out.count("predicted ") == 2 and "true label 7" in result.out
    assert sum(line.startswith("|") for line in result.out.splitlines()) == 2 * 14
    assert result.out.rstrip().endswith("right (" + result.out.rsplit("(", 1)[1].strip())


def test_predict_sends_pixels_as_uint8_and_answers_as_for_scaled_floats(
    server, finished_job, tmp_path
):
    """uint8 pixels go as they are (a quarter of the bytes); the server scales them."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    np.save(tmp_path / "scaled.npy", to_features(pixels))  # float32 in [0, 1]
    answers = []
    for name in ("pixels.npy", "scaled.npy"):
        result = run_cli(
            "predict", finished_job, "--input", str(tmp_path / name), "--json",
            "--address", server.address,
        )  # fmt: skip
        assert result.status == cli_errors.EXIT_OK, result.err
        answers.append(json.loads(result.out)["predictions"])
    assert len(answers[0]) == 5 and answers[0] == answers[1]


def test_cancel_ends_the_job_and_watch_says_so(server):
    submitted = run_cli(
        "train", "--detach", "--epochs", "10000", *SMALL_JOB, "--address", server.address
    )
    job_id = submitted.out.strip()
    canceled = run_cli("cancel", job_id, "--address", server.address)
    assert canceled.status == cli_errors.EXIT_OK, canceled.err
    assert canceled.out.strip() in (f"job {job_id}: CANCELED", f"job {job_id}: CANCELLING")
    watched = run_cli("watch", job_id, "--address", server.address)
    assert one_error_line(watched).startswith(f"ntrain: job {job_id} ended CANCELED")
    no_model = run_cli("predict", job_id, "--mnist-test", "1", "--address", server.address,
                       "--mnist-file", str(SHARED_MNIST))  # fmt: skip
    if SHARED_MNIST.exists():
        assert one_error_line(no_model).startswith("ntrain: not possible now: ")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--lr", "-1"], "learning_rate"),
        (["--layers", "64:relu,7:softmax"], "layers[1].units"),
        (["--batch-size", "0"], "batch_size"),
        (["--dataset", "../etc/passwd"], "dataset"),
    ],
)
def test_a_bad_request_is_one_line_naming_the_field(server, flags, expected):
    spec = [*SMALL_JOB]
    result = run_cli("train", "--detach", *spec, *flags, "--address", server.address)
    line = one_error_line(result)
    assert line.startswith("ntrain: invalid request: ") and expected in line
    assert result.out == ""


def test_cancel_of_a_finished_job_is_one_line_and_status_1(server, finished_job):
    refused = run_cli("cancel", finished_job, "--address", server.address)
    assert one_error_line(refused) == (
        f"ntrain: not possible now: job {finished_job} already ended SUCCEEDED; "
        "only a queued or running job can be canceled"
    )
    assert refused.out == ""


def test_an_unknown_job_is_one_line(server):
    assert one_error_line(run_cli("eval", "no-such-job", "--address", server.address)).startswith(
        "ntrain: not found: "
    )
    assert one_error_line(run_cli("cancel", "no-such-job", "--address", server.address))


def test_serve_stops_cleanly_on_sigterm(server):
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    log = server.log_path.read_text()
    assert f"ready: gRPC on 127.0.0.1:{server.port}" in log and "shutting down" in log
    gone = run_cli("jobs", "--address", server.address)
    assert one_error_line(gone) == (
        f"ntrain: the server is not reachable at {server.address} (connection refused)"
    )


@pytest.mark.parametrize("taken", ["grpc", "metrics"])
def test_serve_on_a_port_in_use_is_one_line(tmp_path, taken):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        ports = ["--port", str(port), "--no-metrics"]
        expected = f"ntrain: cannot start the server (gRPC 127.0.0.1:{port}, no metrics): "
        if taken == "metrics":
            ports = ["--port", "0", "--metrics-port", str(port)]
            expected = f"ntrain: cannot start the server (gRPC 127.0.0.1:0, metrics port {port}): "
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", *ports, "--no-warm-worker",
             "--state-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )  # fmt: skip
    assert result.returncode == cli_errors.EXIT_ERROR
    errors = [line for line in result.stderr.splitlines() if line.startswith("ntrain:")]
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr
    # Nothing before it either: gRPC's C core logs its own line for a taken port.
    assert result.stderr.splitlines() == errors, result.stderr
    if taken == "grpc":
        assert errors[0].endswith(f"port {port} is in use on 127.0.0.1"), errors


@pytest.mark.parametrize(
    ("flags", "status", "expected"),
    [
        (["--port", "70000"], 2, "argument --port: must be a port number in 0..65535, got 70000"),
        (["--port", "-1"], 2, "argument --port: must be a port number in 0..65535, got -1"),
        (["--metrics-port", "65536"], 2, "argument --metrics-port: must be a port number"),
        (["--port-file", "/nonexistent/folder/port"], 1, "the folder /nonexistent/folder does"),
        (["--data-dir", "/nonexistent"], 1, "data directory /nonexistent does not exist"),
        (["--data-dir", "FILE"], 1, "is not a directory"),
    ],
)
def test_serve_refuses_a_bad_start_up_in_one_line_before_ready(tmp_path, flags, status, expected):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    flags = [str(a_file) if flag == "FILE" else flag for flag in flags]
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--no-metrics",
         "--no-warm-worker", "--state-dir", str(tmp_path / "state"), *flags],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )  # fmt: skip
    assert result.returncode == status, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "state").exists()  # refused before the state was touched
