"""The README's notebook example runs as written, on real MNIST."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _library_example() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## The library") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_notebook_example_trains_checkpoints_and_exports(mnist_path, tmp_path):
    env = dict(os.environ, NTRAIN_MNIST_PATH=str(mnist_path), TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", _library_example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.count("EpochEnd(epoch=") == 2 and out.count("CheckpointSaved(") == 2
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", out).group(1))
    assert accuracy >= 96.0, out[-500:]
    assert (tmp_path / "model" / "saved_model.pb").is_file()
    assert (tmp_path / "ckpt" / "checkpoint").is_file()
