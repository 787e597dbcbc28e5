"""Shared test fixtures.

Tests that need a tool (prometheus, promtool, docker-compose, which pip cannot
install, and hadolint, which the dev extra does) use `require_tool`: on a
laptop without it they skip, but with CI=true they fail, because CI installs
every such tool in .ci/run.

Tests that start worker processes, servers or whole trainings are marked
`slow`; `make test-fast` runs the others (no TensorFlow in this process unless
a collected test module imports it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist.npz"
IN_CI = os.environ.get("CI", "").lower() == "true"

# The benchmark peers' own tests need JAX (the `bench` extra) or PyTorch's CPU
# build, which CI does not install (issue 14): where neither is, the file is not
# collected at all rather than skipped test by test.
collect_ignore = (
    []
    if importlib.util.find_spec("jax") or importlib.util.find_spec("torch")
    else ["test_benchmark_peers.py"]
)

# Keep TensorFlow's C++ start-up chatter out of test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The suite's own temporary files (autograph's generated modules from this
# process and every child it starts, which a killed child cannot remove) go to
# one folder, removed when the session ends: a suite run leaves nothing in the
# system's temporary directory. Set before any test module imports TensorFlow.
# pytest's tmp_path folders stay where pytest keeps them (its last three runs).
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
SUITE_TEMP_DIR = Path(tempfile.mkdtemp(prefix="ntrain-tests-"))
os.environ["TMPDIR"] = str(SUITE_TEMP_DIR)
tempfile.tempdir = str(SUITE_TEMP_DIR)


def pytest_unconfigure(config):
    shutil.rmtree(SUITE_TEMP_DIR, ignore_errors=True)


def pytest_collection_finish(session):
    """Split the CPU into two logical devices before TensorFlow starts, if it is here.

    The mirrored-strategy tests need two replicas on a CPU-only host, and the
    split must happen before any TensorFlow op runs in this process (importing
    it runs none). Single-device tests run on the first logical CPU. TF32 is
    turned off, for GPU hosts. When no collected test module imported
    TensorFlow, it is not imported at all.
    """
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        from naive_model.distribute import split_cpu

        split_cpu(2)
        # On a GPU host the strategies pick GPUs, whose matmuls use TF32 by
        # default (10-bit mantissa): tests comparing them with the CPU at
        # rtol 1e-4 need full float32.
        tf.config.experimental.enable_tensor_float_32_execution(False)


def require_tool(name: str) -> str:
    """Return the path of executable `name`; skip without it, or fail in CI.

    It is looked for on PATH, then beside this Python: a tool a pip package of
    the dev extra installs (hadolint) is in the venv's bin, which may not be on PATH.
    """
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{name} is not installed (.ci/run or the dev extra installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def mnist_path() -> Path:
    """The real MNIST file beside the repository (../shared/data/mnist.npz)."""
    if not SHARED_MNIST.exists():
        message = f"real MNIST not found at {SHARED_MNIST}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_MNIST


def compose_without_project_name(compose: dict, tmp_path: Path) -> Path:
    """The compose file less its top-level `name`, which docker-compose 1.29's schema predates.

    Compose v2 validates the file whole in CI (.ci/containers.sh, "compose files valid").
    """
    assert compose.pop("name") == "ntrain"
    path = tmp_path / "docker-compose.unnamed.yml"
    path.write_text(yaml.safe_dump(compose))
    return path


def run_benchmark(
    module: str, folder: Path, *args: str, env=None, timeout: float = 600
) -> tuple[dict, str]:
    """`python -m benchmarks.MODULE ARGS --json FOLDER/MODULE.json` from the repository:
    its JSON report, and what it printed on stderr (it must exit 0)."""
    output = folder / f"{module}.json"
    finished = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args, "--json", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    return json.loads(output.read_text()), finished.stderr
