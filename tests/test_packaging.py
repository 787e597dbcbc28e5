"""`pip install ntrain` is the client and the command line, without TensorFlow.

Builds the wheel, installs it into a fresh virtual environment with only the
client's own dependencies, and lists jobs from a running server with the
installed `ntrain` command and with `ntrain.client`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from service_harness import RunningServer

pytestmark = pytest.mark.slow


def _run(*command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=600, **kwargs
    )


def _size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the package holds, so no build/ lands in the checkout.
    source = root / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / name, source / name)
    for name in ("ntrain", "proto", "naive_model", "service", "benchmarks"):
        shutil.copytree(
            REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "-w", root / "dist", source,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (root / "dist").glob("ntrain-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # The wheel, then exactly the client's requirements from its metadata (PyPI,
    # or pip's cache): `pip install ntrain` without resolving the extras.
    requirements = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]
    installed = _run(python, "-m", "pip", "install", "-q", "--no-deps", wheel)
    assert installed.returncode == 0, installed.stderr[-2000:]
    installed = _run(python, "-m", "pip", "install", "-q", *requirements)
    if installed.returncode != 0:
        pytest.skip(f"cannot install the client's requirements: {installed.stderr[-300:]}")
    return env_dir


def test_the_client_wheel_lists_jobs_without_tensorflow(client_venv, tmp_path):
    python = client_venv / "bin" / "python"
    checked = _run(python, "-m", "pip", "check")
    assert checked.returncode == 0, checked.stdout
    listed = _run(python, "-m", "pip", "list", "--format=freeze")
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert "ntrain" in names
    assert not names & {"tensorflow", "keras", "prometheus-client", "grpcio-reflection"}, names
    site = next((client_venv / "lib").glob("python3*/site-packages"))
    print(f"client venv installed size: {_size(site) / 2**20:.1f} MiB (site-packages)")

    server = RunningServer(tmp_path / "state", warm_worker=False)
    try:
        job = server.submit()
        address = f"127.0.0.1:{server.server.port}"
        # Run outside the repository, so only the installed package can be imported.
        jobs = _run(client_venv / "bin" / "ntrain", "jobs", "--address", address, cwd=tmp_path)
        assert jobs.returncode == 0, jobs.stderr
        assert job.job_id in jobs.stdout
        script = (
            "import sys, ntrain.client\n"
            f"client = ntrain.client.Client({address!r})\n"
            "print([job.job_id for job in client.list()])\n"
            "assert 'tensorflow' not in sys.modules\n"
            "try:\n"
            "    client.get('job-nope')\n"
            "except ntrain.client.NotFound as error:\n"
            "    print(error)\n"
        )
        answer = _run(python, "-c", script, cwd=tmp_path)
        assert answer.returncode == 0, answer.stderr
        assert job.job_id in answer.stdout and "not found" in answer.stdout
    finally:
        server.stop()


def test_serve_without_the_server_extra_says_what_to_install(client_venv, tmp_path):
    served = _run(client_venv / "bin" / "ntrain", "serve", "--port", "0", cwd=tmp_path)
    assert served.returncode == 1
    assert served.stderr.count("\n") == 1, served.stderr
    assert "pip install 'ntrain[server]'" in served.stderr
