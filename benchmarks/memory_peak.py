"""The service's memory estimate against the peak a worker really reaches.

    python -m benchmarks.memory_peak --json FILE [--quick] [--config NAME]...
    python -m benchmarks.memory_peak --estimate-from SAVED.json [--json FILE]

Each configuration runs the worker's own train task (`service.worker.tasks.train`:
load the data, build, one epoch with its test evaluation, a checkpoint, the
SavedModel export) in a fresh interpreter, which reports its peak resident
memory (VmHWM) after each stage, and the runtime's resident size right after
its imports, measured as a worker measures it for the server
(`service.worker.tasks.import_tensorflow`, `Ready.resident_bytes`). Beside it
stands what `TrainConfig.memory_estimate(...).host_bytes(runtime_bytes=...)`
predicts with that runtime, which submissions are checked against
(`service.jobs.validation`): a table of estimate/peak per config, then the
JSON. A full run takes about 15 minutes here (the [300000, 10] model alone
about 6); `--quick` about one. `--estimate-from` measures nothing: it sets
the formula as it is now beside a saved run's peaks and runtime, for
calibrating it against installs measured before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import SHARED_MNIST, machine, publish
from naive_model.config import LayerSpec, TrainConfig

# name: (hidden and output units, optimizer, batch, replicas, data set)
CONFIGS = {
    "book_mnist": ((512, 10), "rmsprop", 128, 1, "mnist"),
    "wide_activations": ((16384, 10), "sgd", 2048, 1, "synthetic"),
    "sgd_100k": ((100_000, 10), "sgd", 128, 1, "synthetic"),
    "adam_100k": ((100_000, 10), "adam", 128, 1, "synthetic"),
    "sgd_100k_mirrored_2": ((100_000, 10), "sgd", 128, 2, "synthetic"),
    "sgd_300k": ((300_000, 10), "sgd", 128, 1, "synthetic"),  # the 4.52 GiB worker
}
QUICK = ("book_mnist", "wide_activations")
# data set: (input size, train and test examples, bytes per feature as it comes)
DATASET_SIZES = {"mnist": (784, 60000, 10000, 1), "synthetic": (784, 2048, 512, 4)}
MIB = 1024**2


def train_config(name: str) -> TrainConfig:
    units, optimizer, batch, _, _ = CONFIGS[name]
    layers = tuple(LayerSpec(units=u, activation="relu") for u in units[:-1])
    layers += (LayerSpec(units=units[-1], activation="softmax"),)
    return TrainConfig(layers=layers, optimizer=optimizer, batch_size=batch, epochs=1, seed=1)


def _peak_mib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return 0


def run_child(name: str, data_dir: Path) -> None:
    """In the child: the worker's train task; prints one JSON line of peaks by stage."""
    peaks = {"start": _peak_mib()}
    from service.protocol import JobSpec, TrainTask
    from service.worker import tasks

    _, _, _, replicas, dataset = CONFIGS[name]
    # The runtime as the server counts it: the resident size a worker reports
    # in its Ready, measured by the same call.
    runtime_bytes = tasks.import_tensorflow()
    peaks["tensorflow_imported"] = _peak_mib()
    strategy = "mirrored" if replicas > 1 else "cpu"
    spec = JobSpec(train=train_config(name), dataset=dataset, strategy=strategy)
    with tempfile.TemporaryDirectory() as job_dir:
        task = TrainTask(
            job_id="job-memory-peak",
            job_dir=Path(job_dir),
            spec=spec,
            strategy=strategy,
            replicas=replicas,
            cuda_visible_devices="",
            gpu_names=(),
            data_dir=data_dir,
        )

        def send(event) -> None:
            kind = type(event).__name__
            if kind == "Failed":
                raise RuntimeError(event.reason)
            if kind in ("Running", "EpochEnd", "CheckpointSaved", "TrainingResult"):
                peaks[kind] = _peak_mib()

        tasks.train(task, send, lambda: False)
    print(json.dumps({"runtime_bytes": runtime_bytes, "peaks": peaks}))


def measure(name: str, data_dir: Path) -> dict:
    """Run one configuration in a fresh worker-like process; its peaks beside the estimate."""
    start = time.perf_counter()
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.memory_peak",
            "--child",
            name,
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=""),
    )
    child = json.loads(completed.stdout.strip().splitlines()[-1])
    entry = estimated(name, child["runtime_bytes"], child["peaks"])
    entry["seconds"] = round(time.perf_counter() - start, 1)
    return entry


def estimated(name: str, runtime_bytes: int, peaks: dict[str, int]) -> dict:
    """A configuration's measured peaks beside the estimate for the runtime measured with them."""
    _, _, _, replicas, dataset = CONFIGS[name]
    input_size, num_train, num_test, feature_bytes = DATASET_SIZES[dataset]
    estimate = train_config(name).memory_estimate(
        input_size=input_size,
        num_train=num_train,
        num_test=num_test,
        num_replicas=replicas,
        feature_bytes=feature_bytes,
    )
    peak = max(peaks.values())
    estimate_mib = estimate.host_bytes(runtime_bytes=runtime_bytes) / MIB
    return {
        "peak_mib": peak,
        "estimate_mib": round(estimate_mib),
        "estimate/peak": round(estimate_mib / peak, 3),
        "runtime_mib": round(runtime_bytes / MIB),
        "runtime_bytes": runtime_bytes,
        "peak_mib_by_stage": peaks,
        "weights_mib": round(estimate.weights / MIB, 1),
        "replicas": replicas,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_peak")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), help="run these")
    parser.add_argument(
        "--data-dir", type=Path, default=SHARED_MNIST.parent, help="holds mnist.npz"
    )
    parser.add_argument(
        "--estimate-from",
        type=Path,
        help="measure nothing: the estimate of today's formula beside a saved run's peaks",
    )
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.child, args.data_dir)
        return
    if args.estimate_from:
        saved = json.loads(args.estimate_from.read_text())
        measured = {
            name: estimated(name, entry["runtime_bytes"], entry["peak_mib_by_stage"])
            for name, entry in saved["entries"].items()
        }
        machine_info = saved["machine"]
    else:
        names = args.config or (QUICK if args.quick else tuple(CONFIGS))
        measured = {name: measure(name, args.data_dir) for name in names}
        machine_info = machine()
    print(f"{'config':<22}{'runtime':>9}{'peak':>7}{'estimate':>10}{'estimate/peak':>15}  (MiB)")
    for name, entry in measured.items():
        print(
            f"{name:<22}{entry['runtime_mib']:>9}{entry['peak_mib']:>7}"
            f"{entry['estimate_mib']:>10}{entry['estimate/peak']:>15}"
        )
    ratios = [entry["estimate/peak"] for entry in measured.values()]
    publish(
        {
            "entries": measured,
            "estimate/peak": {"min": min(ratios), "max": max(ratios)},
            "machine": machine_info,
        },
        args.json,
    )


if __name__ == "__main__":
    main()
