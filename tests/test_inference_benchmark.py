"""benchmarks.inference runs end to end on a small data set and reports consistent figures.

Timings are not asserted (they belong to the benchmark): this keeps it from rotting.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from conftest import run_benchmark

from naive_model.data import synthetic_dataset

pytestmark = pytest.mark.slow

ENTRIES = (
    "predict_1",
    "predict_1_uint8",
    "predict_1024",
    "predict_1024_uint8",
    "evaluate",
    "predict_uncached",
)
SECTIONS = {  # where each entry's paired median is reported
    "predict_1": ("predict_1", "service/in_process_paired_median"),
    "predict_1_uint8": ("predict_1", "uint8_service/in_process_paired_median"),
    "predict_1024": ("predict_1024", "float32", "service/in_process_paired_median"),
    "predict_1024_uint8": ("predict_1024", "uint8", "service/in_process_paired_median"),
    "evaluate": ("evaluate", "service/in_process_paired_median"),
    "predict_uncached": ("predict_uncached", "service/in_process_paired_median"),
}
STEPS = (
    "request_build",
    "request_serialize",
    "request_parse",
    "request_to_array",
    "reply_build",
    "reply_serialize",
    "reply_parse",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The --quick report on an MNIST-shaped set (784 features, 10 classes), 2,560 examples."""
    folder = tmp_path_factory.mktemp("bench")
    data = synthetic_dataset(num_train=2560, num_test=256)
    npz = folder / "small.npz"
    np.savez(
        npz, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test
    )
    report, _ = run_benchmark("inference", folder, "--quick", "--data", str(npz))
    return report


def test_every_entry_ran_side_by_side_in_every_round(report):
    rounds = report["rounds_seconds"]
    assert report["config"]["rounds"] == 2
    for entry in ENTRIES:
        for side in ("service", "in_process"):
            assert len(rounds[f"{entry}_{side}"]) == 2
            assert all(seconds > 0 for seconds in rounds[f"{entry}_{side}"])
    for dtype in ("float32", "uint8"):
        for step in STEPS:
            assert len(rounds[f"serialisation_{dtype}_{step}"]) == 2
    assert len(rounds["predict_1024_examples_service"]) == 2
    for entry in ENTRIES:
        paired = statistics.median(
            a / b
            for a, b in zip(rounds[f"{entry}_service"], rounds[f"{entry}_in_process"], strict=True)
        )
        *path, key = SECTIONS[entry]
        section = report
        for name in path:
            section = section[name]
        assert section[key] == pytest.approx(paired)


def test_figures_are_positive_and_consistent(report):
    single = report["predict_1"]["service"]
    assert 0 < single["p50_ms"] <= single["p99_ms"] and single["samples"] == 2 * 5
    for dtype, width in (("float32", 4), ("uint8", 1)):
        batch = report["predict_1024"][dtype]
        assert batch["request_bytes"] > 1024 * 784 * width  # one block of values, and the rest
        assert batch["request_bytes"] < 1024 * 784 * width + 100
        parts = batch["serialisation_ms"]
        assert set(parts) == set(STEPS) and all(ms > 0 for ms in parts.values())
        assert batch["serialisation_total_ms"] == pytest.approx(sum(parts.values()))
        assert batch["serialisation_share_of_service"] == pytest.approx(
            batch["serialisation_total_ms"] / batch["service_ms"]
        )
    assert report["predict_1024"]["examples_service_ms"] > 0
    assert report["evaluate"]["service_seconds"] > 0 and report["evaluate"]["examples"] == 256
    assert report["predict_uncached"]["service_seconds"] > 0
    assert set(report["met"]) == {name.removesuffix(" <=") for name in report["targets"]}


def test_the_service_answers_as_the_in_process_model_and_caches_as_it_says(report):
    checks = report["checks"]
    assert checks["predict_1024_float32_max_abs_difference"] < 1e-6
    assert checks["predict_1024_uint8_max_abs_difference"] < 1e-6
    assert checks["predict_1024_examples_max_abs_difference"] < 1e-6
    assert checks["evaluate_loss_difference"] < 1e-5
    assert checks["evaluate_accuracy_difference"] == 0
    assert checks["models_loaded_in_cached_calls"] == 0
    assert checks["models_loaded_per_uncached_call"] == [1, 1]
    assert checks["inference_worker_started_with_server"]
    assert checks["inference_workers_started"] == 1  # never replaced
