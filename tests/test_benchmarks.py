"""The benchmarks run, interleave their rounds, and compute their ratios from their entries.

Timings are not asserted here (they belong to the benchmarks themselves):
these tests keep the benchmark programs from rotting, on a small data set.
"""

from __future__ import annotations

import os
import statistics

import numpy as np
import pytest
from conftest import run_benchmark

from benchmarks.report import paired_ratio, side_by_side
from naive_model.data import synthetic_dataset

pytestmark = pytest.mark.slow


PEER_PACKAGES = {
    "jax_scan": "jax",
    "jax_step": "jax",
    "torch_eager": "torch",
    "torch_compile": "torch",
}


def test_paired_ratio_is_the_median_of_the_ratios_within_rounds():
    assert paired_ratio([10.0, 30.0, 8.0], [5.0, 10.0, 8.0]) == 2.0  # ratios 2, 3, 1


def test_side_by_side_interleaves_the_entries_within_each_round():
    calls = []

    def timer(name):
        def run():
            calls.append(name)
            return float(len(calls))

        return run

    rates = side_by_side({"a": timer("a"), "b": timer("b"), "c": timer("c")}, rounds=2)

    assert calls == ["a", "b", "c", "a", "b", "c"]
    assert rates == {"a": [1.0, 4.0], "b": [2.0, 5.0], "c": [3.0, 6.0]}


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """MNIST-shaped (784 features, 10 classes) but 20 batches per epoch."""
    data = synthetic_dataset(num_train=2560, num_test=256)
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(
        path, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test
    )
    return path


def without_packages(tmp_path, *packages: str) -> dict[str, str]:
    """An environment in which importing `packages` fails as if they were not installed.

    Then the run is the same on a machine that has them as in CI, which has not.
    """
    hiding = tmp_path / "hide"
    hiding.mkdir()
    for package in packages:
        (hiding / f"{package}.py").write_text(
            f'raise ModuleNotFoundError("No module named {package!r}", name={package!r})\n'
        )
    path = [str(hiding), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def test_throughput_reports_every_entry_and_ratios_of_the_fastest_rounds(small_npz, tmp_path):
    env = without_packages(tmp_path, "jax", "torch")
    report, stderr = run_benchmark(
        "throughput", tmp_path, "--quick", "--data", str(small_npz), env=env
    )

    entries = report["entries"]
    assert set(entries) == {"seed_eager", "compiled", "keras_fit_best", "roofline", "mirrored_2"}
    for peer, package in PEER_PACKAGES.items():
        line = f"{peer}: skipped, {package} is not installed"
        assert report["skipped"][peer].startswith(line)
        assert line in stderr
    for name in ("seed_eager", "compiled", "keras_fit_best", "roofline"):
        assert len(entries[name]["rounds"]) == report["setup"]["side_by_side_rounds"] == 3
        assert entries[name]["samples_per_sec"] == max(entries[name]["rounds"]) > 0
    for name in ("compiled", "keras_fit_best"):
        entry, tried = entries[name], entries[name]["tried"]
        assert entry["samples_per_sec"] == tried[entry["best"]] == max(tried.values())
    assert len(entries["compiled"]["tried"]) == 4  # --quick: steps_per_execution 32, epoch x XLA
    assert len(entries["keras_fit_best"]["tried"]) == 6  # 1, 32, epoch x XLA
    rate = {name: entry["samples_per_sec"] for name, entry in entries.items()}
    assert report["ratios"] == pytest.approx(
        {
            "compiled/keras_fit_best": rate["compiled"] / rate["keras_fit_best"],
            "compiled/roofline": rate["compiled"] / rate["roofline"],
            "compiled/seed_eager": rate["compiled"] / rate["seed_eager"],
            "mirrored_2/compiled": rate["mirrored_2"] / rate["compiled"],
        }
    )
    for other in ("keras_fit_best", "roofline", "seed_eager"):
        per_round = [
            a / b
            for a, b in zip(entries["compiled"]["rounds"], entries[other]["rounds"], strict=True)
        ]
        assert report["ratios_paired_median"][f"compiled/{other}"] == pytest.approx(
            statistics.median(per_round)
        )
    # The divergence check: with and without it in the same rounds, and timed alone.
    checks = report["divergence_check_rounds"]
    for setting, cost in report["divergence_check_cost"].items():
        with_check, without = checks[f"{setting},checked=True"], checks[f"{setting},checked=False"]
        assert len(with_check) == len(without) == 3
        paired = statistics.median(b / a for a, b in zip(with_check, without, strict=True))
        assert cost == pytest.approx(paired - 1)
    assert 0 < report["divergence_check_seconds_per_call"] < 1e-3
    assert 0 < report["divergence_check_share_at_spe_1"] < 1
    assert report["machine"]["cores"] >= 1 and report["machine"]["tensorflow"]


def test_step_anatomy_times_the_chain_beside_the_roofline(small_npz, tmp_path):
    report, _ = run_benchmark("step_anatomy", tmp_path, "--quick", "--data", str(small_npz))

    fastest = report["samples_per_sec"]
    entries = {"roofline", "roofline_serial", "matmul_chain", "chain_update", "compiled"}
    assert set(fastest) == entries
    assert all(rate > 0 for rate in fastest.values())
    rounds = report["samples_per_sec_rounds"]
    assert all(len(values) == 3 for values in rounds.values())
    assert fastest["compiled"] == max(
        max(rounds["compiled_jit=False"]), max(rounds["compiled_jit=True"])
    )
    assert report["ratios_to_roofline"] == pytest.approx(
        {name: fastest[name] / fastest["roofline"] for name in fastest if name != "roofline"}
    )
    assert set(report["ratios_to_roofline_paired_median"]) == entries - {"roofline"}


def test_memory_peak_reports_a_workers_peak_beside_the_estimate(tmp_path):
    report, _ = run_benchmark("memory_peak", tmp_path, "--config", "wide_activations")
    from benchmarks.memory_peak import MIB, train_config

    entry = report["entries"]["wide_activations"]
    stages = entry["peak_mib_by_stage"]
    assert entry["peak_mib"] == max(stages.values()) > stages["tensorflow_imported"] > 0
    # The runtime is what the worker measured after its imports, in this install.
    runtime = entry["runtime_bytes"]
    assert 0 < runtime / MIB < stages["tensorflow_imported"] + 1  # VmHWM in whole MiB, floored
    estimate = train_config("wide_activations").memory_estimate(
        input_size=784, num_train=2048, num_test=512
    )
    assert round(estimate.host_bytes(runtime_bytes=runtime) / MIB) == entry["estimate_mib"]
    # The estimate submissions are checked against covers the real peak, and closely.
    assert 1.0 <= entry["estimate/peak"] <= 1.3


def test_datasets_reports_upload_and_conversion_figures(tmp_path):
    results, _ = run_benchmark(
        "datasets", tmp_path, "--quick", "--only", "upload", "--only", "conversion",
        "--work-dir", str(tmp_path),
    )  # fmt: skip
    upload = results["upload"]
    assert upload["bytes"] == 64 * 2**20 and upload["MB_per_second"] > 0
    assert upload["server_rss_mib"]["peak"] >= upload["server_rss_mib"]["idle"] > 0
    for kind in ("csv", "parquet"):
        entry = results["conversion"]["entries"][kind]
        assert entry["rows"] == 6000 and entry["seconds_per_GB"] > 0 and entry["cpu_seconds"] > 0
    assert len(results["upload"]["load_average"]["before"]) == 3


def test_the_sweeps_replay_stops_a_slow_starter_for_good_only_with_optunas_rule():
    from benchmarks.sweep import what_if

    # Test accuracy after epochs 1, 2, 3; rungs at 1 and 3 epochs, reduction factor 3.
    # Trial 1 starts behind trial 0 and ends best.
    curves = [
        [0.90, 0.93, 0.95],
        [0.85, 0.95, 0.99],
        [0.80, 0.85, 0.90],
        [0.70, 0.80, 0.85],
        [0.60, 0.70, 0.80],
        [0.50, 0.60, 0.70],
    ]
    replayed = what_if(curves, 3)
    # Optuna's rule: trial 0 goes on alone; trial 1 is behind it at the rung and stops for good.
    assert replayed["optuna"] == {"epochs": 3 + 5 * 1, "starts": 6, "best": 0.95}
    # The service's: trial 1 goes on too, since fewer than three trials had reached the rung.
    assert replayed["patient"] == {"epochs": 3 + 3 + 4 * 1, "starts": 6, "best": 0.99}
    # ASHA: trial 0 waits for three trials at the rung; trial 1 is promoted once six are there.
    assert replayed["asha"] == {"epochs": 6 + 2 + 2, "starts": 6 + 2, "best": 0.99}
    assert replayed["synchronous"] == {"epochs": 6 + 2 * 2, "starts": 6 + 2, "best": 0.99}


def test_predict_floor_times_grpc_and_the_hop_beside_the_model(tmp_path):
    report, _ = run_benchmark(
        "predict_floor", tmp_path, "--rounds", "1", "--calls", "2", timeout=300
    )
    assert set(report["median_ms"]) == {"in_process", "grpc", "grpc_pipe"}
    assert all(len(seconds) == 1 for seconds in report["rounds_seconds"].values())
    assert report["hop_ms"] == round(
        report["median_ms"]["grpc_pipe"] - report["median_ms"]["grpc"], 2
    )
