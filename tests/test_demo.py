"""`make demo` end to end: `python -m service.cli.demo` in a child process.

HOME points at a temporary directory, so the demo finds MNIST only where the
test puts it (~/.keras/datasets/mnist.npz). Without it, the download of Keras's copy is
sent to a closed local port so it fails at once, with or without internet,
and the demo must say so in one line and train on scikit-learn's bundled 8x8
digits (on the synthetic set when scikit-learn cannot be imported).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def run_demo(
    home: Path, tmp_path: Path, *flags: str, **extra_env: str
) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("NTRAIN_MNIST_PATH", "KERAS_HOME", "NO_PROXY", "no_proxy")
    }
    env.update(HOME=str(home), TMPDIR=str(tmp_path), **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "service.cli.demo", "--images", "3", *(flags or ("--epochs", "1"))],
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


def pids_mentioning(folder: Path) -> list[int]:
    """The processes whose command line names `folder`."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(folder) in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # the process ended while we looked
    return pids


def demo_state_dir(output: str) -> Path:
    """The temporary state directory the demo's output names (beside its server log)."""
    return Path(re.search(r"log (\S+)/server\.log\)", output).group(1))


def assert_server_gone(output: str) -> None:
    """The demo's temporary state is removed, and no process still uses it."""
    state_dir = demo_state_dir(output)
    assert not state_dir.exists()
    assert pids_mentioning(state_dir) == []


def kill_processes_mentioning(folder: Path) -> None:
    """SIGKILL every process whose command line names `folder` (this test's own)."""
    for pid in pids_mentioning(folder):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue  # it ended while we looked


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


def closed_proxy() -> dict[str, str]:
    """Proxy settings that send the MNIST download to a closed local port: it fails at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    return {"https_proxy": closed, "HTTPS_PROXY": closed}


def test_demo_without_mnist_says_so_in_one_line_and_trains_on_the_bundled_digits(tmp_path):
    home = tmp_path / "home"
    home.mkdir()

    result = run_demo(home, tmp_path, "--epochs", "20", **closed_proxy())  # the digits' default

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    notices = [line for line in out.splitlines() if "MNIST" in line]
    assert len(notices) == 1, out
    assert notices[0].startswith("MNIST not found (looked in ")
    assert notices[0].endswith(
        "Training on scikit-learn's 8x8 digits instead (1,797 handwritten digits, bundled: "
        "no download)."
    )
    assert "64 -> 512 relu -> 10 softmax on digits.npz" in out and "epoch 20/20 done" in out
    assert "3 scikit-learn digits test images and what the model says:" in out
    assert out.count("true label") == 3
    # Each 8x8 digit is drawn doubled: 8 text rows of 16 characters between bars.
    art = [line for line in out.splitlines() if re.fullmatch(r"\|.{16}\|.*", line)]
    assert len(art) == 3 * 8, out
    assert final_accuracy(out) >= 90.0  # 96-98% measured; synthetic data gave 100%
    assert_server_gone(out)


def test_demo_without_mnist_or_scikit_learn_uses_synthetic_data(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    no_sklearn = tmp_path / "no-sklearn" / "sklearn"
    no_sklearn.mkdir(parents=True)
    (no_sklearn / "__init__.py").write_text("raise ImportError('not installed')\n")
    path = os.pathsep.join([str(no_sklearn.parent), os.environ.get("PYTHONPATH", "")])

    result = run_demo(home, tmp_path, PYTHONPATH=path, **closed_proxy())

    assert result.returncode == 0, result.stdout + result.stderr
    notices = [line for line in result.stdout.splitlines() if "MNIST" in line]
    assert len(notices) == 1, result.stdout
    assert notices[0].endswith(
        "Training on the synthetic data set instead "
        "(for real digits offline: pip install 'ntrain[demo]')."
    )
    assert "on synthetic" in result.stdout and "synthetic test examples" in result.stdout
    assert final_accuracy(result.stdout) > 50.0
    assert_server_gone(result.stdout)


def start_demo_until_running(tmp_path) -> tuple[subprocess.Popen, list[str]]:
    """A demo training for 100,000 epochs, read until its job is RUNNING, and its lines so far."""
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "NTRAIN_MNIST_PATH"}
    env.update(HOME=str(home), TMPDIR=str(tmp_path), **closed_proxy())
    # A child inherits an ignored SIGINT, and a suite started in the background by
    # a non-interactive shell (`make test &`) has it ignored: the demo would never
    # see a test's Ctrl-C. It starts with SIGINT as an interactive shell leaves it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        demo = subprocess.Popen(
            [sys.executable, "-m", "service.cli.demo", "--epochs", "100000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )
    finally:
        if previous is not None:  # None: a handler not set from Python, left as is
            signal.signal(signal.SIGINT, previous)
    seen = []
    for line in demo.stdout:  # bounded: the demo ends, or we stop reading at RUNNING
        seen.append(line)
        if " RUNNING" in line:
            break
    if not any(" RUNNING" in line for line in seen):
        demo.kill()
        raise AssertionError("".join(seen) + demo.stderr.read())
    return demo, seen


def test_ctrl_c_cancels_the_job_and_stops_the_server(tmp_path):
    demo, seen = start_demo_until_running(tmp_path)
    try:
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
            kill_processes_mentioning(tmp_path)  # a killed demo cannot stop its server
    output = "".join(seen) + out
    assert demo.returncode == 130, output + err
    assert "cancelling job" in output and "stopping the server" in output
    assert err.strip() == "ntrain demo: interrupted; the server was stopped"
    assert_server_gone(output)


def test_a_demo_killed_with_sigkill_leaves_no_server_behind(tmp_path):
    demo, seen = start_demo_until_running(tmp_path)
    state_dir = demo_state_dir("".join(seen))
    try:
        server = [pid for pid in pids_mentioning(state_dir) if pid != demo.pid]
        assert server, "".join(seen)
        demo.kill()  # no clean-up of its own: the server notices its parent gone
        demo.wait()
        deadline = time.monotonic() + 120
        while pids_mentioning(state_dir):
            assert time.monotonic() < deadline, f"left running: {pids_mentioning(state_dir)}"
            time.sleep(0.2)
        log = (state_dir / "server.log").read_text()
        assert f"ntrain: shutting down: the process that started it ({demo.pid}) ended" in log
    finally:
        kill_processes_mentioning(tmp_path)
