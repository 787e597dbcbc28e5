"""`make demo` end to end: `python -m service.cli.demo` in a child process.

HOME points at a temporary directory, so the demo finds MNIST only where the
test puts it (~/.keras/datasets/mnist.npz). Without it, the Keras download is
sent to a closed local port so it fails at once, with or without internet,
and the demo must say so in one line and train on the synthetic set.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def run_demo(home: Path, tmp_path: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("NTRAIN_MNIST_PATH", "KERAS_HOME", "NO_PROXY", "no_proxy")
    }
    env.update(HOME=str(home), TMPDIR=str(tmp_path), **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "service.cli.demo", "--epochs", "1", "--images", "3"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=300,
    )


def final_accuracy(output: str) -> float:
    match = re.search(r"^final test accuracy: ([\d.]+)%$", output, re.MULTILINE)
    assert match, output
    return float(match.group(1))


def assert_server_gone(output: str) -> None:
    """The demo's temporary state is removed, and no process still uses it."""
    state_dir = Path(re.search(r"log (\S+)/server\.log\)", output).group(1))
    assert not state_dir.exists()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            assert str(state_dir) not in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue  # the process ended while we looked


def test_demo_trains_on_mnist_found_in_the_keras_cache(tmp_path, mnist_path):
    home = tmp_path / "home"
    (home / ".keras" / "datasets").mkdir(parents=True)
    shutil.copy(mnist_path, home / ".keras" / "datasets" / "mnist.npz")

    result = run_demo(home, tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"MNIST found at {home}/.keras/datasets/mnist.npz" in out
    assert "784 -> 512 relu -> 10 softmax on mnist" in out
    assert "epoch 1/1 done in" in out and "SUCCEEDED" in out
    assert "3 MNIST test images and what the model says:" in out and out.count("true label") == 3
    assert "true label 7" in out  # the first MNIST test image is a 7
    assert final_accuracy(out) >= 90.0
    assert_server_gone(out)


def test_demo_without_mnist_says_so_in_one_line_and_uses_synthetic_data(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"

    result = run_demo(home, tmp_path, https_proxy=closed, HTTPS_PROXY=closed)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    notices = [line for line in lines if "MNIST" in line]
    assert len(notices) == 1, result.stdout
    assert notices[0].startswith("MNIST not found (looked in ")
    assert notices[0].endswith("Training on the synthetic data set instead.")
    assert "on synthetic" in result.stdout and "synthetic test examples" in result.stdout
    assert final_accuracy(result.stdout) > 50.0
    assert_server_gone(result.stdout)


def test_ctrl_c_cancels_the_job_and_stops_the_server(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {key: value for key, value in os.environ.items() if key != "NTRAIN_MNIST_PATH"}
    env.update(HOME=str(home), TMPDIR=str(tmp_path), https_proxy=closed, HTTPS_PROXY=closed)
    demo = subprocess.Popen(
        [sys.executable, "-m", "service.cli.demo", "--epochs", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        seen = []
        for line in demo.stdout:  # bounded: the demo ends, or we stop reading at RUNNING
            seen.append(line)
            if " RUNNING" in line:
                break
        assert any(" RUNNING" in line for line in seen), "".join(seen) + demo.stderr.read()
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    output = "".join(seen) + out
    assert demo.returncode == 130, output + err
    assert "cancelling job" in output and "stopping the server" in output
    assert err.strip() == "ntrain demo: interrupted; the server was stopped"
    assert_server_gone(output)
