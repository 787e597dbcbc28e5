"""What updating the Prometheus metrics costs the training loop, measured in one process.

    python -m benchmarks.metrics_overhead --json FILE [--quick] [--data PATH]

One naive_model.Trainer (MNIST, 784 -> 512 relu -> 10 softmax, batch 128,
steps_per_execution 32) trains epochs alternately with two on_progress
callbacks:
  metrics_on   updates a real ServiceMetrics exactly as the service does for
               every compiled call (job_progress, plus job_first_step once)
  metrics_off  does nothing
The epochs run in ABBA order each round, so a drift of the machine's speed
during the run falls on both arms alike. The same Trainer (the same compiled
function, the same weights' history) serves both arms.

Reported: samples/s of each arm (all its epochs' examples over all their
seconds), the relative difference (off - on) / off (target <= 3%), the median
of the per-round differences, and the time spent inside the metric updates
themselves, per call and as a share of the metrics_on epochs' time, which is
the overhead measured directly rather than as a difference of two noisy rates.
See benchmarks/README_metrics.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from benchmarks.report import SHARED_MNIST, publish  # noqa: E402
from naive_model.config import TrainConfig  # noqa: E402
from naive_model.data import Dataset, load_npz, synthetic_dataset  # noqa: E402
from naive_model.results import Progress  # noqa: E402
from naive_model.trainer import Trainer  # noqa: E402
from service.jobs.reporting import report_metrics  # noqa: E402
from service.metrics import ServiceMetrics  # noqa: E402

BATCH = 128
STEPS_PER_EXECUTION = 32
TARGET = 0.03


class MetricsCallback:
    """on_progress that feeds a ServiceMetrics with the job manager's own code, timing itself."""

    def __init__(self, metrics: ServiceMetrics, job_id: str = "job-bench", strategy: str = "cpu"):
        self.metrics = metrics
        self.job_id = job_id
        self.strategy = strategy
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, progress: Progress) -> None:
        start = time.perf_counter()
        if self.calls == 0:
            self.metrics.job_first_step(self.job_id, 0.0)
        report_metrics(self.metrics, self.job_id, self.strategy, progress)
        self.calls += 1
        self.seconds += time.perf_counter() - start


def no_metrics(progress: Progress) -> None:
    """The metrics-off arm: the callback still runs, and does nothing."""


def load_data(path: Path, num_train: int | None) -> Dataset:
    dataset = load_npz(path, name="mnist") if path.is_file() else synthetic_dataset(num_train=8192)
    if num_train is not None and num_train < len(dataset.x_train):
        dataset = Dataset(
            name=dataset.name,
            x_train=dataset.x_train[:num_train],
            y_train=dataset.y_train[:num_train],
            x_test=dataset.x_test,
            y_test=dataset.y_test,
            num_classes=dataset.num_classes,
        )
    return dataset


def run(args) -> dict:
    dataset = load_data(args.data, args.num_train)
    # The book's network and training are TrainConfig's defaults.
    config = TrainConfig(batch_size=BATCH, epochs=1, steps_per_execution=STEPS_PER_EXECUTION)
    trainer = Trainer(config, dataset)
    metrics = ServiceMetrics(CollectorRegistry())
    metrics_on = MetricsCallback(metrics)
    trainer.train_epoch(no_metrics)  # traces and warms up; not counted

    totals = {"on": {"examples": 0, "seconds": 0.0}, "off": {"examples": 0, "seconds": 0.0}}
    rounds = []
    for _ in range(args.rounds):
        per_arm = {"on": [0, 0.0], "off": [0, 0.0]}
        for arm in ("on", "off", "off", "on"):  # ABBA
            result = trainer.train_epoch(metrics_on if arm == "on" else no_metrics)
            per_arm[arm][0] += result.examples
            per_arm[arm][1] += result.seconds
        for arm, (examples, seconds) in per_arm.items():
            totals[arm]["examples"] += examples
            totals[arm]["seconds"] += seconds
        on, off = (per_arm[arm][0] / per_arm[arm][1] for arm in ("on", "off"))
        rounds.append({"on": on, "off": off, "relative_difference": (off - on) / off})

    on, off = (totals[arm]["examples"] / totals[arm]["seconds"] for arm in ("on", "off"))
    relative = (off - on) / off
    # The registry really holds the series the updates made.
    exposition = generate_latest(metrics.registry).decode()
    assert 'ntrain_train_batches_total{job_id="job-bench",strategy="cpu"}' in exposition
    return {
        "benchmark": "metrics_overhead",
        "dataset": dataset.name,
        "num_train": len(dataset.x_train),
        "batch_size": BATCH,
        "steps_per_execution": STEPS_PER_EXECUTION,
        "steps_per_epoch": trainer.steps_per_epoch,
        "rounds": args.rounds,
        "epochs_per_arm": 2 * args.rounds,
        "metrics_on_samples_per_sec": on,
        "metrics_off_samples_per_sec": off,
        "relative_difference": relative,
        "median_round_relative_difference": statistics.median(
            r["relative_difference"] for r in rounds
        ),
        "per_round": rounds,
        "metric_update_calls": metrics_on.calls,
        "metric_update_microseconds_per_call": 1e6 * metrics_on.seconds / metrics_on.calls,
        "metric_update_share_of_epoch_time": metrics_on.seconds / totals["on"]["seconds"],
        "target": TARGET,
        "within_target": relative <= TARGET,
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_overhead")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="2 rounds on 16384 examples")
    parser.add_argument("--data", type=Path, default=SHARED_MNIST, help="mnist.npz")
    parser.add_argument("--rounds", type=int, help="ABBA rounds (default 5; --quick 2)")
    args = parser.parse_args(argv)
    args.num_train = 16384 if args.quick else None
    args.rounds = args.rounds or (2 if args.quick else 5)

    results = run(args)
    publish(results, args.json)
    print(
        f"metrics on {results['metrics_on_samples_per_sec']:,.0f} samples/s, "
        f"off {results['metrics_off_samples_per_sec']:,.0f} samples/s: "
        f"{100 * results['relative_difference']:+.2f}% "
        f"(updates {results['metric_update_microseconds_per_call']:.1f} us per call, "
        f"{100 * results['metric_update_share_of_epoch_time']:.3f}% of the time)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
