"""Training throughput and accuracy by compute precision: float32 beside bfloat16 (and float16).

    python -m benchmarks.precision [--json FILE] [--quick] [--data PATH]
                                   [--precision float32 --precision bfloat16 ...] [--jit]

Trains the book's network (784 -> 512 relu -> 10 softmax, RMSprop 1e-3,
batch 128) on real MNIST with `naive_model.Trainer`, a whole epoch per
compiled call, once per precision. Each precision first trains one epoch
(which traces and warms up), then all of them train in interleaved rounds
(`--quick`: 2; full: 5), one epoch each per round, so a change in the
machine's speed falls on every precision alike; a precision's throughput is
its fastest round. Its test accuracy is measured after its last round (all
precisions have then trained the same number of epochs from the same seed).
`bfloat16_vs_float32` is the median over rounds of the two rates' ratio.

On a CPU this says what bfloat16 costs where the hardware has no bfloat16
matmul units: TensorFlow converts to float32 around each matmul. On a GPU with
tensor cores (A100, H100) bfloat16 matmuls run at about twice TF32's rate; run
it there (`deploy/gpu-smoke.sh` does) to see it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.report import SHARED_MNIST, machine, paired_ratio, publish, side_by_side  # noqa: E402
from naive_model.config import PRECISIONS, StrategyConfig, TrainConfig  # noqa: E402
from naive_model.data import load_mnist  # noqa: E402
from naive_model.distribute import describe_strategy, make_strategy  # noqa: E402
from naive_model.trainer import Trainer  # noqa: E402


def run(
    data: Path, precisions: list[str], rounds: int, *, jit_compile: bool, strategy: str
) -> dict:
    mnist = load_mnist(data, download=False)
    distribution = make_strategy(StrategyConfig(kind=strategy))
    trainers = {
        precision: Trainer(
            TrainConfig(epochs=rounds + 1, precision=precision, jit_compile=jit_compile),
            mnist,
            distribution,
        )
        for precision in precisions
    }
    for trainer in trainers.values():
        trainer.train_epoch()  # traces and warms up

    def timer(trainer: Trainer):
        return lambda: trainer.train_epoch().examples_per_second

    rates = side_by_side({p: timer(t) for p, t in trainers.items()}, rounds)
    results: dict = {
        "benchmark": "precision",
        "machine": machine(),
        "strategy": describe_strategy(distribution),
        "jit_compile": jit_compile,
        "epochs": rounds + 1,
        "samples_per_sec": {p: max(r) for p, r in rates.items()},
        "test_accuracy": {p: t.evaluate().accuracy for p, t in trainers.items()},
        "rounds": rates,
    }
    if "bfloat16" in rates and "float32" in rates:
        results["bfloat16_vs_float32"] = paired_ratio(rates["bfloat16"], rates["float32"])
        results["accuracy_points_bfloat16_minus_float32"] = 100 * (
            results["test_accuracy"]["bfloat16"] - results["test_accuracy"]["float32"]
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    parser.add_argument("--data", type=Path, default=SHARED_MNIST, help="MNIST .npz")
    parser.add_argument(
        "--precision",
        action="append",
        choices=PRECISIONS,
        help="a precision to run (repeatable; default float32 and bfloat16)",
    )
    parser.add_argument("--jit", action="store_true", help="compile the step with XLA")
    parser.add_argument(
        "--strategy", default="auto", help="cpu, gpu, mirrored or auto (default auto)"
    )
    args = parser.parse_args(argv)
    precisions = args.precision or ["float32", "bfloat16"]
    results = run(
        args.data,
        precisions,
        2 if args.quick else 5,
        jit_compile=args.jit,
        strategy=args.strategy,
    )
    publish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
