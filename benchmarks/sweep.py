"""Successive halving against random search without early stopping, paired in one run.

    python -m benchmarks.sweep --json FILE [--trials 16] [--epochs 9] [--seed 0]

One real server (`ntrain serve`, one CPU job at a time, a warm worker) runs
two experiments on MNIST, one after the other, with the same random searcher
and seed, so trial n has the same parameters in both: a learning rate (log
scale), a hidden width (log scale) and an optimizer, up to `--epochs` epochs
per trial. One stops trials by successive halving (rungs at 1, 3, 9 epochs,
reduction factor 3), the other runs every trial to the end.

Reports, per arm: epochs trained (every trial's, summed), wall time (the
experiment's creation to its end), best test accuracy of a trial that ran to
its end, and the time from the experiment's creation until a trial's epoch
first reached 97.5% test accuracy; the ratios successive halving / random
(targets: epochs <= 0.4, wall time <= 0.5, best accuracy within 0.3 points),
and the load average sampled through the run. Each trial's test accuracy
after every epoch is kept (`curve`), and random search's curves are replayed
under other kinds of successive halving (`what_if`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from ntrain.v1 import training_pb2 as pb

from benchmarks.report import SHARED_MNIST, machine, publish
from ntrain.client import Client
from service.cli.local_server import LocalServer

EPOCHS_TARGET = 0.4
WALL_TARGET = 0.5
ACCURACY_POINTS_TARGET = 0.3
THRESHOLD = 0.975


def experiment_spec(
    *, trials: int, epochs: int, seed: int, early_stopping: bool
) -> pb.ExperimentSpec:
    spec = pb.ExperimentSpec(
        base=pb.JobSpec(
            dataset="mnist",
            epochs=epochs,
            layers=[
                pb.LayerSpec(units=512, activation="relu"),
                pb.LayerSpec(units=10, activation="softmax"),
            ],
            strategy=pb.StrategySpec(name="cpu"),
        ),
        parameters=[
            pb.SearchParameter(
                name="learning_rate", float_range=pb.FloatRange(low=1e-4, high=1e-1, log=True)
            ),
            pb.SearchParameter(
                name="layers[0].units", int_range=pb.IntRange(low=32, high=1024, log=True)
            ),
            pb.SearchParameter(
                name="optimizer",
                categorical=pb.CategoricalValues(values=["adam", "rmsprop", "momentum"]),
            ),
        ],
        metric="eval_accuracy",
        searcher="random",
        max_trials=trials,
        max_concurrent_trials=1,
        seed=seed,
        name="successive halving" if early_stopping else "random, no early stopping",
    )
    if early_stopping:
        spec.early_stopping.CopyFrom(
            pb.EarlyStopping(kind="successive_halving", min_epochs=1, reduction_factor=3)
        )
    return spec


def run_arm(client: Client, spec: pb.ExperimentSpec, progress: Path | None) -> dict:
    experiment = client.submit_experiment(spec)
    print(f"{spec.name}: {experiment.experiment_id}", flush=True)
    done = client.wait_experiment(experiment.experiment_id)
    start = done.create_time.ToNanoseconds() / 1e9
    end = done.end_time.ToNanoseconds() / 1e9
    first_reach = None
    curves: dict[int, list[float]] = {}  # trial number: its test accuracy after each epoch
    for trial in done.trials:
        by_epoch: dict[int, float] = {}
        for event in client.watch(trial.job_id):
            payload = event.payload
            if not isinstance(payload, pb.EpochSummary):
                continue
            by_epoch[payload.epoch] = payload.eval_accuracy
            if payload.eval_accuracy >= THRESHOLD:
                reached = event.time.timestamp() - start
                first_reach = reached if first_reach is None else min(first_reach, reached)
        curves[trial.number] = [by_epoch[epoch] for epoch in sorted(by_epoch)]
    # Where each trial's time went, from its job's transitions: waiting in the queue,
    # starting (a worker process, TensorFlow, the data set), and training.
    phases = {"queued": 0.0, "starting": 0.0, "training": 0.0}
    for trial in done.trials:
        job = client.get(trial.job_id)
        times = {t.state: t.time.ToNanoseconds() / 1e9 for t in job.transitions}
        created = job.create_time.ToNanoseconds() / 1e9
        ended = max(times.values())
        starting = times.get(pb.JOB_STATE_STARTING, ended)
        running = times.get(pb.JOB_STATE_RUNNING, ended)
        phases["queued"] += starting - created
        phases["starting"] += running - starting
        phases["training"] += ended - running
    finished = [t for t in done.trials if t.state == pb.TRIAL_STATE_SUCCEEDED]
    best = max(finished, key=lambda t: t.metric)
    arm = {
        "experiment_id": done.experiment_id,
        "state": pb.ExperimentState.Name(done.state),
        "trials": len(done.trials),
        "epochs_trained": sum(trial.epochs for trial in done.trials),
        "stopped_early": sum(1 for t in done.trials if t.state == pb.TRIAL_STATE_STOPPED_EARLY),
        "wall_seconds": round(end - start, 1),
        "best_test_accuracy": best.metric,
        "best_trial": {"number": best.number, "params": dict(best.params)},
        "seconds_to_97_5": None if first_reach is None else round(first_reach, 1),
        "trial_seconds": {name: round(seconds, 1) for name, seconds in phases.items()},
        "per_trial": [
            {
                "number": t.number,
                "params": dict(t.params),
                "epochs": t.epochs,
                "state": pb.TrialState.Name(t.state),
                "metric": t.metric,
                "curve": curves[t.number],
            }
            for t in done.trials
        ],
    }
    if progress is not None:  # an arm takes many minutes: keep it whatever comes after
        with progress.open("a") as out:
            out.write(json.dumps({spec.name: arm}) + "\n")
    return arm


def rungs(epochs: int, min_epochs: int, reduction_factor: int) -> list[int]:
    """The epochs at which successive halving decides: 1, 3, 9 for (9, 1, 3)."""
    points = []
    rung = min_epochs
    while rung < epochs:
        points.append(rung)
        rung *= reduction_factor
    return points


def _top(value: float, values: list[float], reduction_factor: int) -> bool:
    """Whether `value` is among the best len(values) // reduction_factor (at least 1) of them."""
    keep = max(len(values) // reduction_factor, 1)
    return value >= sorted(values, reverse=True)[keep - 1]


def what_if(curves: list[list[float]], epochs: int, eta: int = 3, min_epochs: int = 1) -> dict:
    """Three kinds of successive halving replayed on trials that all ran to the end.

    curves: each trial's test accuracy after each epoch, in the order the
    trials were asked (random search's arm has them all). One trial trains
    at a time, as in the benchmark. For each kind: the epochs it would train,
    the job starts it would need (a new trial, or a stopped one resumed), and
    the best accuracy among trials trained to the end.

    - optuna: Optuna's SuccessiveHalvingPruner: a trial that reaches a rung
      goes on if it is among the best 1/eta of the trials that reached it so
      far (the best of them while fewer than eta have), and is stopped for
      good otherwise.
    - patient: what this service does (`PatientHalvingPruner`): the same,
      but a trial goes on while fewer than eta trials have reached its rung.
    - asha: ASHA as published (Li et al. 2020), with one worker: a stopped
      trial is paused, and resumed from its checkpoint once it is among the
      best 1/eta of its rung; paused trials are promoted before new ones start.
    - synchronous: every trial to the first rung, then the best 1/eta of them
      to the next, and so on.
    """
    points = [*rungs(epochs, min_epochs, eta), epochs]
    results = {}

    # optuna and patient: trials in order; a stop is final.
    for kind, fewest in (("optuna", 1), ("patient", eta)):
        reached: dict[int, list[float]] = {point: [] for point in points}
        trained, finals = 0, []
        for curve in curves:
            for point in points:
                value = curve[point - 1]
                reached[point].append(value)
                if point == epochs:
                    trained += epochs
                    finals.append(value)
                elif len(reached[point]) >= fewest and not _top(value, reached[point], eta):
                    trained += point
                    break
        results[kind] = {"epochs": trained, "starts": len(curves), "best": max(finals)}

    # asha: one worker; promote a paused trial when one qualifies, else start a new one.
    at: dict[int, dict[int, float]] = {point: {} for point in points}  # rung: trial: value
    promoted: dict[int, set[int]] = {point: set() for point in points}
    trained, starts, last, waiting = 0, 0, None, list(range(len(curves)))
    while True:
        job = None
        for index in range(len(points) - 2, -1, -1):  # the highest rung first
            point, values = points[index], at[points[index]]
            ready = [
                trial
                for trial, value in values.items()
                if trial not in promoted[point]
                and _top(value, list(values.values()), eta)
                and len(values) >= eta  # as published: a rung promotes once it has eta trials
            ]
            if ready:
                trial = max(ready, key=values.__getitem__)
                promoted[point].add(trial)
                job = (trial, point, points[index + 1])
                break
        if job is None and waiting:
            job = (waiting.pop(0), 0, points[0])
        if job is None:
            break
        trial, begin, end = job
        starts += trial != last  # the trial that just reached a rung goes on in its job
        trained += end - begin
        at[end][trial] = curves[trial][end - 1]
        last = trial
    finished = at[epochs]
    results["asha"] = {
        "epochs": trained,
        "starts": starts,
        "best": max(finished.values()) if finished else None,
    }

    # synchronous: whole rungs.
    alive, trained, starts = list(range(len(curves))), 0, 0
    begin = 0
    for point in points:
        trained += (point - begin) * len(alive)
        starts += len(alive)
        if point == epochs:
            break
        keep = max(len(alive) // eta, 1)
        alive = sorted(alive, key=lambda trial: curves[trial][point - 1], reverse=True)[:keep]
        begin = point
    results["synchronous"] = {
        "epochs": trained,
        "starts": starts,
        "best": max(curves[trial][epochs - 1] for trial in alive),
    }
    return results


class LoadSampler:
    """The 1-minute load average every 10 s while the run lasts."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(10.0):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        samples = self.samples or [os.getloadavg()[0]]
        return {"mean": round(statistics.mean(samples), 1), "max": round(max(samples), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=SHARED_MNIST, help="mnist.npz")
    args = parser.parse_args()
    if not args.data.is_file():
        parser.error(f"--data: no file {args.data}")
    load = LoadSampler()
    with tempfile.TemporaryDirectory() as state:
        server = LocalServer(
            Path(state), ["--data-dir", str(args.data.parent), "--no-metrics", "--max-queue", "64"]
        )
        try:
            with Client(server.address) as client:
                arms = {
                    name: run_arm(
                        client,
                        experiment_spec(
                            trials=args.trials,
                            epochs=args.epochs,
                            seed=args.seed,
                            early_stopping=name == "successive_halving",
                        ),
                        None if args.json is None else args.json.with_suffix(".arms.jsonl"),
                    )
                    for name in ("random", "successive_halving")
                }
        finally:
            server.stop()
    random, halving = arms["random"], arms["successive_halving"]
    replayed = what_if([t["curve"] for t in random["per_trial"]], args.epochs)
    # Seconds a job start and an epoch cost, from the two arms (every trial starts once):
    # wall = starts * start + epochs * epoch, solved for the two.
    per_epoch = (random["wall_seconds"] - halving["wall_seconds"]) / (
        random["epochs_trained"] - halving["epochs_trained"]
    )
    per_start = (halving["wall_seconds"] - per_epoch * halving["epochs_trained"]) / halving[
        "trials"
    ]
    # The replay of the service's rule must decide as the service did in the other arm.
    replayed["patient"]["as_the_arm_did"] = (
        replayed["patient"]["epochs"] == halving["epochs_trained"]
        and replayed["patient"]["best"] == halving["best_test_accuracy"]
    )
    for kind in replayed.values():
        wall = kind["starts"] * per_start + kind["epochs"] * per_epoch
        kind["wall_ratio"] = round(wall / random["wall_seconds"], 3)
        kind["epochs_ratio"] = round(kind["epochs"] / random["epochs_trained"], 3)
        kind["best_points"] = round(100 * (kind["best"] - random["best_test_accuracy"]), 2)
    ratios = {
        "epochs": round(halving["epochs_trained"] / random["epochs_trained"], 3),
        "wall_time": round(halving["wall_seconds"] / random["wall_seconds"], 3),
        "best_accuracy_points": round(
            100 * (halving["best_test_accuracy"] - random["best_test_accuracy"]), 2
        ),
        # The wall time with every trial's start-up taken out, which both arms pay alike.
        "training_time": round(
            halving["trial_seconds"]["training"] / random["trial_seconds"]["training"], 3
        ),
    }
    results = {
        "benchmark": "sweep",
        "command": "python -m benchmarks.sweep "
        f"--trials {args.trials} --epochs {args.epochs} --seed {args.seed} --data {args.data}",
        "machine": machine(),
        "load_average": load.stop(),
        "arms": arms,
        "ratios": ratios,
        # Random search's curves replayed under three kinds of successive halving.
        "what_if": {
            "seconds_per_start": round(per_start, 2),
            "seconds_per_epoch": round(per_epoch, 2),
            **replayed,
        },
        "targets": {
            "epochs": EPOCHS_TARGET,
            "wall_time": WALL_TARGET,
            "best_accuracy_points": -ACCURACY_POINTS_TARGET,
        },
        "met": {
            "epochs": ratios["epochs"] <= EPOCHS_TARGET,
            "wall_time": ratios["wall_time"] <= WALL_TARGET,
            "best_accuracy": ratios["best_accuracy_points"] >= -ACCURACY_POINTS_TARGET,
        },
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    publish(results, args.json)


if __name__ == "__main__":
    main()
