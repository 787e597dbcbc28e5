"""Preemption on this machine: how soon an urgent job runs, and what the victim pays.

    python -m benchmarks.preemption --json FILE [--rounds 3] [--data PATH]

A server with one CPU job slot (warm workers off, so every start is the same
cold start) trains a low-priority job: the book's network on MNIST, 2 epochs,
50 steps per compiled call. Once it is a third into its first epoch, a
high-priority job of one epoch is submitted. Rounds alternate with the same
two jobs run alone, so each figure is a pair from one round. Reports, as
medians over the rounds:
  stop_seconds     the urgent job's submission to the victim's checkpointed stop
                   (target: one compiled call of the victim, `call_seconds`)
  start_seconds    the victim's stop to the urgent job's first progress, beside
                   `alone_start_seconds`, the same job's start on an idle server
  steps_lost       steps the victim trained again after resuming (target 0)
  extra_seconds    the victim's submit-to-end time less the same job's alone,
                   less the urgent job's run: what the pause itself cost it
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from benchmarks.report import SHARED_MNIST, machine, publish
from service.api.server import ServerConfig, TrainingServer
from service.cli.specs import book_job_spec

LOW, HIGH = -100, 100
CALL_STEPS = 50
BATCH = 128  # the book's
FIRST_CALL_STEPS = 1  # the service's workers trace with a one-step call


def spec(epochs: int, priority: int) -> pb.JobSpec:
    return book_job_spec(
        pb.JobSpec(
            epochs=epochs,
            strategy=pb.StrategySpec(name="cpu"),
            steps_per_execution=CALL_STEPS,
            priority=priority,
            seed=3,
        )
    )


class Timeline:
    """A job's events as they arrive (monotonic seconds), from a WatchJob stream."""

    def __init__(self, stub, job_id: str, submitted: float):
        self.submitted = submitted
        self.progress: list[tuple[float, pb.Progress]] = []
        self.states: list[tuple[float, pb.StateTransition]] = []
        for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=1800):
            now = time.monotonic()
            if event.HasField("progress"):
                self.progress.append((now, event.progress))
            elif event.HasField("state_change"):
                self.states.append((now, event.state_change))
        self.ended = self.states[-1][0]
        if self.states[-1][1].state != pb.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"job {job_id} ended: {self.states[-1][1]}")

    def first_progress(self) -> float:
        return self.progress[0][0]


def one_round(stub) -> dict:
    # Alone: the victim's job, then the urgent one, each on an idle server.
    submitted = time.monotonic()
    job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(2, LOW)))
    alone = Timeline(stub, job.job_id, submitted)
    submitted = time.monotonic()
    job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(1, HIGH)))
    urgent_alone = Timeline(stub, job.job_id, submitted)

    # Preempted: the urgent job comes a third into the victim's first epoch.
    submitted = time.monotonic()
    victim_job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(2, LOW)))
    following = ThreadPoolExecutor(1).submit(Timeline, stub, victim_job.job_id, submitted)
    while True:
        job = stub.GetJob(pb.GetJobRequest(job_id=victim_job.job_id))
        if job.progress.step >= job.progress.steps_per_epoch // 3 > 0:
            break
        time.sleep(0.02)
    urgent_submitted = time.monotonic()
    urgent_job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec(1, HIGH)))
    urgent = Timeline(stub, urgent_job.job_id, urgent_submitted)
    victim = following.result(1800)

    (stopped_at, preempted), *_ = [
        (when, change) for when, change in victim.states if "preempted by" in change.reason
    ]
    before = [p for when, p in victim.progress if when <= stopped_at]
    after = [p for when, p in victim.progress if when > stopped_at]
    resumed_from = after[0].step - FIRST_CALL_STEPS  # a worker's first call runs one step
    urgent_run = urgent.ended - urgent.first_progress()
    return {
        "call_seconds": statistics.median(
            CALL_STEPS * BATCH / p.examples_per_second for _, p in alone.progress[1:]
        ),
        "stop_seconds": stopped_at - urgent_submitted,
        "start_seconds": urgent.first_progress() - stopped_at,
        "alone_start_seconds": urgent_alone.first_progress() - urgent_alone.submitted,
        "steps_lost": before[-1].step - resumed_from,
        "victim_seconds": victim.ended - victim.submitted,
        "alone_seconds": alone.ended - alone.submitted,
        "urgent_run_seconds": urgent_run,
        "extra_seconds": (victim.ended - victim.submitted)
        - (alone.ended - alone.submitted)
        - urgent_run,
        "preempted_reason": preempted.reason,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=SHARED_MNIST, help="MNIST's .npz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ntrain-preemption-") as state:
        server = TrainingServer(
            ServerConfig(
                port=0,
                metrics_port=None,
                state_dir=Path(state),
                data_dir=args.data.parent,
                warm_worker=False,
                gpu_inventory=(),
                max_cpu_jobs=1,
            )
        )
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        try:
            rounds = [one_round(stub) for _ in range(args.rounds)]
        finally:
            channel.close()
            server.stop()
    figures = {
        key: statistics.median(r[key] for r in rounds)
        for key in rounds[0]
        if key != "preempted_reason"
    }
    for key, value in figures.items():
        print(f"{key:22} {value:8.2f}")
    print(f"a victim's transition: {rounds[-1]['preempted_reason']}")
    publish({"machine": machine(), "medians": figures, "rounds": rounds}, args.json)


if __name__ == "__main__":
    main()
