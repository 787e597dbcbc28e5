"""Training throughput of the naive model, measured side by side in one process.

    python -m benchmarks.throughput --json FILE [--quick] [--data PATH]

Entries (samples per second, MNIST, batch 128, 784 -> 512 relu -> 10 softmax,
one optimizer for all):
  seed_eager      the book's eager loop: one one_training_step per batch
  compiled        naive_model.Trainer at its best steps_per_execution
  keras_fit_best  keras.Sequential + model.fit at its best steps_per_execution
                  and jit_compile
  roofline        what the machine's measured tf.matmul rate at this step's
                  shapes allows (forward, and backward for the weights)
  mirrored_2      naive_model.Trainer over 2 logical CPU devices
  jax_scan        JAX: the whole epoch in one jax.jit of lax.scan
  jax_step        JAX: one jax.jit call per batch
  torch_eager     PyTorch: the step eagerly, one Python call per batch
  torch_compile   PyTorch: the step through torch.compile
The peers (jax_*, torch_*; benchmarks/peers_jax.py and peers_torch.py) do the
same work per step and per epoch as compiled; each is skipped, with one line,
when its package is not installed. seed_eager (400 steps), roofline, the peers
and every configuration tried for compiled and keras_fit_best (an epoch each)
are timed in interleaved rounds; a configuration's samples_per_sec is its
fastest round, an entry's that of its best configuration.
See benchmarks/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import timeit
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.report import SHARED_MNIST, machine, paired_ratio, publish, side_by_side  # noqa: E402
from naive_model.distribute import split_cpu  # noqa: E402  (TensorFlow must not start first)

# Two logical CPUs for mirrored_2, configured before TensorFlow initialises its
# devices. The single-device entries run on the first one.
split_cpu(2)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.roofline import BATCH, HIDDEN, flops_per_sample, roofline_loops  # noqa: E402
from naive_model.config import LayerSpec, StrategyConfig, TrainConfig  # noqa: E402
from naive_model.data import BatchGenerator, load_mnist  # noqa: E402
from naive_model.distribute import make_strategy  # noqa: E402
from naive_model.eager import one_training_step  # noqa: E402
from naive_model.layers import build_model  # noqa: E402
from naive_model.optimizers import make_optimizer  # noqa: E402
from naive_model.trainer import Trainer  # noqa: E402


def _config(args, **overrides) -> TrainConfig:
    fields = dict(
        layers=(
            LayerSpec(units=HIDDEN, activation="relu"),
            LayerSpec(units=10, activation="softmax"),
        ),
        initializer="glorot",
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        batch_size=BATCH,
        epochs=1,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def bench_seed_eager(args, dataset) -> tuple[dict, Callable[[], float]]:
    """The book's loop, eager: numpy batches fed to one_training_step.

    Returns its setup and a function that times `args.eager_steps` steps.
    """
    config = _config(args)
    model = build_model(dataset.input_size, config.layers, initializer="glorot")
    optimizer = make_optimizer(config)
    batches = BatchGenerator(dataset.x_train, dataset.y_train, BATCH)
    for _ in range(5):  # warm-up: first calls build kernels and optimizer slots
        one_training_step(model, *batches.next(), optimizer=optimizer)

    def some_steps() -> float:
        start = time.perf_counter()
        for _ in range(args.eager_steps):
            one_training_step(model, *batches.next(), optimizer=optimizer)
        return args.eager_steps * BATCH / (time.perf_counter() - start)

    return {"steps_per_round": args.eager_steps}, some_steps


def _timed_epochs(trainer: Trainer, epochs: int) -> float:
    trainer.train_epoch()  # traces and warms up
    best = 0.0
    for _ in range(epochs):
        best = max(best, trainer.train_epoch().examples_per_second)
    return best


def compiled_timers(args, dataset, strategy) -> dict[str, Callable[[], float]]:
    """naive_model.Trainer at each steps_per_execution, XLA off and on.

    Each trainer has trained (and traced) one epoch; its timer trains one
    more and returns the samples/s.
    """
    timers = {}
    for spe in args.steps_per_execution:
        for jit in (False, True):
            trainer = Trainer(
                _config(args, steps_per_execution=spe, jit_compile=jit), dataset, strategy
            )
            trainer.train_epoch()
            timers[f"spe={spe or 'epoch'},jit={jit}"] = lambda trainer=trainer: (
                trainer.train_epoch().examples_per_second
            )
    return timers


class _UncheckedTrainer(Trainer):
    """A Trainer without the divergence check, to measure what the check costs."""

    def _check_finite(self, loss_sum: float, epoch: int, step: int) -> None:
        pass


def divergence_check_timers(args, dataset, strategy) -> dict[str, Callable[[], float]]:
    """The compiled loop with and without its divergence check.

    At one step per call (the most checks an epoch can have: 468) and at a
    whole epoch per call with XLA.
    """
    timers = {}
    for spe, jit in ((1, False), (0, True)):
        config = _config(args, steps_per_execution=spe, jit_compile=jit)
        for checked, kind in ((True, Trainer), (False, _UncheckedTrainer)):
            trainer = kind(config, dataset, strategy)
            trainer.train_epoch()
            timers[f"spe={spe or 'epoch'},jit={jit},checked={checked}"] = lambda trainer=trainer: (
                trainer.train_epoch().examples_per_second
            )
    return timers


def time_divergence_check(trainer: Trainer) -> float:
    """Seconds one divergence check takes (the best of five timeit repeats)."""
    loops = 100_000
    calls = timeit.repeat(lambda: trainer._check_finite(0.25, 1, 1), number=loops, repeat=5)
    return min(calls) / loops


def bench_mirrored(args, dataset, best_compiled: str) -> dict:
    """The best compiled configuration over two replicas (two logical CPUs)."""
    strategy = make_strategy(StrategyConfig(kind="mirrored", num_devices=2))
    spe, jit = (part.split("=")[1] for part in best_compiled.split(","))
    config = _config(
        args, steps_per_execution=0 if spe == "epoch" else int(spe), jit_compile=jit == "True"
    )
    trainer = Trainer(config, dataset, strategy)
    return {
        "samples_per_sec": _timed_epochs(trainer, args.epochs),
        "replicas": strategy.num_replicas_in_sync,
    }


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self._start


def keras_fit_timers(args, dataset) -> dict[str, Callable[[], float]]:
    """keras.Sequential with the same layers, optimizer and batch, via model.fit,
    at steps_per_execution 1, 32 and a whole epoch, XLA off and on.

    Each model has fitted (and traced) one epoch; its timer fits one more and
    returns the samples/s of that epoch.
    """
    steps_per_epoch = len(dataset.x_train) // BATCH
    x = dataset.x_train[: steps_per_epoch * BATCH]
    y = dataset.y_train[: steps_per_epoch * BATCH]

    def fit_one_epoch(model: keras.Model) -> float:
        timer = _EpochTimer()
        with tf.device("/cpu:0"):
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[timer])
        return len(x) / timer.seconds

    timers = {}
    for spe in (1, 32, steps_per_epoch):
        for jit in (False, True):
            with tf.device("/cpu:0"):
                model = keras.Sequential(
                    [
                        keras.Input((dataset.input_size,)),
                        keras.layers.Dense(HIDDEN, activation="relu"),
                        keras.layers.Dense(10, activation="softmax"),
                    ]
                )
                model.compile(
                    optimizer=make_optimizer(_config(args)),
                    loss="sparse_categorical_crossentropy",
                    metrics=["accuracy"],
                    steps_per_execution=spe,
                    jit_compile=jit,
                )
            fit_one_epoch(model)
            timers[f"spe={spe},jit={jit}"] = lambda model=model: fit_one_epoch(model)
    return timers


def bench_roofline(args, dataset) -> tuple[dict, Callable[[], float]]:
    """Samples/s allowed by the measured tf.matmul rate at the step's shapes.

    The step's four matmuls (benchmarks.roofline), run independently, so
    that TensorFlow overlaps them, and converted to samples per second.
    """
    matmuls = roofline_loops(dataset.input_size)["overlapped"]
    steps = len(dataset.x_train) // BATCH

    def one_epoch() -> float:
        with tf.device("/cpu:0"):
            start = time.perf_counter()
            matmuls(tf.constant(steps)).numpy()
            return steps * BATCH / (time.perf_counter() - start)

    with tf.device("/cpu:0"):
        matmuls(tf.constant(10)).numpy()
    return {"flops_per_sample": flops_per_sample(dataset.input_size)}, one_epoch


# The same model, step and epoch in other frameworks: package -> (module, entries).
PEERS = {
    "jax": ("benchmarks.peers_jax", ("jax_scan", "jax_step")),
    "torch": ("benchmarks.peers_torch", ("torch_eager", "torch_compile")),
}
INSTALL_HINTS = {
    "jax": "pip install -e '.[bench]'",
    "torch": "pip install torch==2.13.0, the CPU build",
}


def peer_timers(args, dataset) -> tuple[dict, dict[str, Callable[[], float]], dict[str, str]]:
    """The peers whose package is installed, each having trained (and compiled) one epoch.

    Returns their setups, their timers (one epoch each, samples/s), and for
    every peer skipped the line that says why (also printed on stderr).
    """
    setups, timers, skipped = {}, {}, {}
    for package, (module_name, names) in PEERS.items():
        reason = None
        if args.optimizer != "sgd":
            reason = f"the peers train with SGD only, not {args.optimizer}"
        else:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as error:
                if (error.name or "").split(".")[0] != package:
                    raise
                reason = f"{package} is not installed ({INSTALL_HINTS[package]})"
        if reason is not None:
            for name in names:
                skipped[name] = f"{name}: skipped, {reason}"
                print(skipped[name], file=sys.stderr)
            continue
        runners = module.peers(
            dataset, hidden=HIDDEN, batch_size=BATCH, learning_rate=args.learning_rate
        )
        for name, runner in runners.items():
            setups[name] = {"library": f"{package} {metadata.version(package)}"}
            timers[name] = lambda runner=runner: runner.train_epoch().examples_per_second
    return setups, timers, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and steps")
    parser.add_argument("--data", type=Path, default=None, help="MNIST .npz (default: ../shared)")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)
    args.epochs = 1 if args.quick else 3  # mirrored_2's timed epochs
    args.rounds = 3 if args.quick else 7
    args.eager_steps = 100 if args.quick else 400
    args.steps_per_execution = [32, 0] if args.quick else [1, 32, 128, 0]

    data_path = args.data or (SHARED_MNIST if SHARED_MNIST.exists() else None)
    dataset = load_mnist(data_path)
    single = make_strategy(StrategyConfig(kind="cpu"))

    # Every configuration of every entry is timed in the same interleaved
    # rounds, so no entry's choice of setting rests on a luckier minute.
    # Other work on the machine only ever slows a round down, so a
    # configuration's figure is its fastest round (as timeit takes the
    # minimum); an entry's is its best configuration's. All rounds are in the JSON.
    setups, timers = {}, {}
    setups["seed_eager"], timers["seed_eager"] = bench_seed_eager(args, dataset)
    setups["roofline"], timers["roofline"] = bench_roofline(args, dataset)
    peer_setups, peer_timings, skipped = peer_timers(args, dataset)
    setups.update(peer_setups)
    timers.update(peer_timings)
    groups = {
        "compiled": compiled_timers(args, dataset, single),
        "keras_fit_best": keras_fit_timers(args, dataset),
        "divergence_check": divergence_check_timers(args, dataset, single),
    }
    for entry, configurations in groups.items():
        timers.update({f"{entry} {name}": timer for name, timer in configurations.items()})
    rounds = side_by_side(timers, args.rounds)

    results = {}
    for name, setup in setups.items():
        results[name] = {"samples_per_sec": max(rounds[name]), "rounds": rounds[name], **setup}
    check_rounds = {
        name.removeprefix("divergence_check "): samples
        for name, samples in rounds.items()
        if name.startswith("divergence_check ")
    }
    check_cost = {
        spe: paired_ratio(check_rounds[f"{spe},checked=False"], check_rounds[f"{spe},checked=True"])
        for spe in ("spe=1,jit=False", "spe=epoch,jit=True")
    }
    del groups["divergence_check"]
    for entry, configurations in groups.items():
        tried = {name: max(rounds[f"{entry} {name}"]) for name in configurations}
        best = max(tried, key=tried.get)
        results[entry] = {
            "samples_per_sec": tried[best],
            "best": best,
            "rounds": rounds[f"{entry} {best}"],
            "tried": tried,
        }
    results["roofline"]["matmul_gflops_per_sec"] = (
        results["roofline"]["samples_per_sec"] * results["roofline"]["flops_per_sample"] / 1e9
    )
    check_seconds = time_divergence_check(Trainer(_config(args), dataset, single))
    # One check per compiled call: at one step per call, one per step.
    step_seconds_at_spe_1 = BATCH / max(check_rounds["spe=1,jit=False,checked=True"])
    results["mirrored_2"] = bench_mirrored(args, dataset, results["compiled"]["best"])
    rate = {name: entry["samples_per_sec"] for name, entry in results.items()}
    others = ["keras_fit_best", "roofline", "seed_eager", *peer_setups]
    report = {
        "entries": results,
        "skipped": skipped,
        "ratios": {
            **{f"compiled/{other}": rate["compiled"] / rate[other] for other in others},
            "mirrored_2/compiled": rate["mirrored_2"] / rate["compiled"],
        },
        "ratios_paired_median": {
            f"compiled/{other}": paired_ratio(
                results["compiled"]["rounds"], results[other]["rounds"]
            )
            for other in others
        },
        # Paired median of unchecked/checked samples/s, minus one: what the
        # loss's NaN check costs the compiled loop (target: at most 1%).
        "divergence_check_cost": {spe: ratio - 1 for spe, ratio in check_cost.items()},
        "divergence_check_rounds": check_rounds,
        # The check timed alone, and its share of the fastest one-step-per-call
        # epoch (468 checks): what the side-by-side rounds cannot resolve.
        "divergence_check_seconds_per_call": check_seconds,
        "divergence_check_share_at_spe_1": check_seconds / step_seconds_at_spe_1,
        "setup": {
            "side_by_side_rounds": args.rounds,
            "optimizer": args.optimizer,
            "learning_rate": args.learning_rate,
            "batch_size": BATCH,
            "model": f"784-{HIDDEN}-10",
            "quick": args.quick,
            "data": str(data_path or "keras cache"),
        },
        "machine": machine(),
    }
    publish(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
