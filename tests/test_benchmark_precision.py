"""benchmarks.precision runs and reports every precision side by side (timings not asserted)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from naive_model.data import synthetic_dataset

pytestmark = pytest.mark.slow


def test_precision_reports_each_precisions_rate_and_accuracy(tmp_path):
    data = synthetic_dataset(num_train=2560, num_test=256)
    npz, output = tmp_path / "small.npz", tmp_path / "precision.json"
    np.savez(
        npz, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test
    )
    subprocess.run(
        [sys.executable, "-m", "benchmarks.precision", "--quick", "--strategy", "cpu"]
        + ["--data", str(npz), "--json", str(output)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    report = json.loads(output.read_text())
    assert set(report["samples_per_sec"]) == set(report["test_accuracy"]) == {"float32", "bfloat16"}
    for precision, rounds in report["rounds"].items():
        assert len(rounds) == 2 and report["samples_per_sec"][precision] == max(rounds) > 0
    rounds = report["rounds"]
    paired = [b / f for b, f in zip(rounds["bfloat16"], rounds["float32"], strict=True)]
    assert report["bfloat16_vs_float32"] == pytest.approx(statistics.median(paired))
    assert report["strategy"] == "OneDeviceStrategy over CPU:0" and report["epochs"] == 3
