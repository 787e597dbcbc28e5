"""The training service against the library, measured side by side in one run.

    python -m benchmarks.service_benchmark --json FILE [--quick] [--data PATH]

Reports:
  throughput              samples/s of the same job (MNIST, 784 -> 512 relu -> 10
                          softmax, glorot, SGD 1e-3, batch 128, a whole epoch per
                          compiled call) trained by naive_model.Trainer in this
                          process ("library") and by a real server's worker
                          ("service"); each keeps its best epoch after the first
                          (tracing), runs alternate, and the ratio service/library
                          is the figure (target >= 0.95).
  first_progress_seconds  time from calling SubmitJob to receiving the job's first
                          progress event, with no warm worker ("cold": the worker
                          imports TensorFlow) and with one ready ("warm"; target
                          <= 1.5 s). Median over the samples.
See benchmarks/README_service.md for how to read it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from benchmarks.report import SHARED_MNIST, machine, publish
from ntrain.client.states import state_name
from service.api.server import ServerConfig, TrainingServer
from service.cli.specs import book_job_spec

THROUGHPUT_TARGET = 0.95
WARM_FIRST_PROGRESS_TARGET = 1.5


def job_spec(epochs: int, steps_per_execution: int) -> pb.JobSpec:
    """The book's network on MNIST, with SGD 1e-3 as the throughput benchmark trains it."""
    return book_job_spec(
        pb.JobSpec(
            optimizer=pb.OptimizerSpec(name="sgd", learning_rate=1e-3),
            epochs=epochs,
            strategy=pb.StrategySpec(name="cpu"),
            steps_per_execution=steps_per_execution,
        )
    )


class Server:
    """A TrainingServer on a free loopback port, and a client for it."""

    def __init__(self, state_dir: Path, data_dir: Path, *, warm_worker: bool):
        self.server = TrainingServer(
            ServerConfig(
                port=0,
                metrics_port=None,
                state_dir=state_dir,
                data_dir=data_dir,
                warm_worker=warm_worker,
                gpu_inventory=(),
            )
        )
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = training_pb2_grpc.TrainingServiceStub(self.channel)

    def wait_for_warm_worker(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.stub.GetServerInfo(pb.GetServerInfoRequest()).warm_workers < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no warm worker after {timeout:.0f} s")
            time.sleep(0.05)

    def wait_idle(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.stub.GetServerInfo(pb.GetServerInfoRequest()).running_jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs still running after {timeout:.0f} s")
            time.sleep(0.05)

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


def first_progress_seconds(server: Server, spec: pb.JobSpec) -> float:
    """Seconds from calling SubmitJob to receiving the first progress event."""
    start = time.perf_counter()
    job = server.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    for event in server.stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=300):
        if event.HasField("progress"):
            seconds = time.perf_counter() - start
            break
        if event.HasField("state_change") and event.state_change.state == pb.JOB_STATE_FAILED:
            raise RuntimeError(f"job failed: {event.state_change.reason}")
    server.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=60)
    return seconds


def service_epochs(server: Server, spec: pb.JobSpec) -> list[dict]:
    """Run the job to its end; its epochs as (examples, seconds)."""
    job = server.stub.SubmitJob(pb.SubmitJobRequest(spec=spec))
    epochs, steps_per_epoch = [], 0
    for event in server.stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=1800):
        if event.HasField("progress"):
            steps_per_epoch = event.progress.steps_per_epoch
        if event.HasField("epoch_end"):
            examples = steps_per_epoch * spec.batch_size
            epochs.append({"examples": examples, "seconds": event.epoch_end.seconds})
    final = server.stub.GetJob(pb.GetJobRequest(job_id=job.job_id))
    if final.state != pb.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"service job ended {state_name(final.state)}: {final}")
    return epochs


def library_epochs(data_dir: Path, spec: pb.JobSpec) -> list[dict]:
    """The same job with naive_model.Trainer in this process (TensorFlow loads here)."""
    from naive_model.config import StrategyConfig
    from naive_model.data import load_dataset
    from naive_model.distribute import make_strategy
    from naive_model.trainer import Trainer
    from service.api.convert import job_spec_from_proto

    config = job_spec_from_proto(spec).train
    dataset = load_dataset("mnist", data_dir=data_dir)
    trainer = Trainer(config, dataset, make_strategy(StrategyConfig(kind="cpu")))
    return [
        {"examples": result.examples, "seconds": result.seconds}
        for result in trainer.fit(config.epochs)
    ]


def best_rate(epochs: list[dict]) -> float:
    """Samples per second of the fastest epoch after the first (tracing)."""
    return max(epoch["examples"] / epoch["seconds"] for epoch in epochs[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and samples")
    parser.add_argument("--data", type=Path, default=SHARED_MNIST, help="mnist.npz to train on")
    parser.add_argument("--steps-per-execution", type=int, default=0, help="0 = whole epoch")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.data.is_file():
        parser.error(f"no MNIST at {args.data}; pass --data PATH/mnist.npz")
    epochs = 3 if args.quick else 4
    rounds = 1 if args.quick else 2
    latency_samples = 2 if args.quick else 3

    with tempfile.TemporaryDirectory(prefix="ntrain-bench-") as scratch:
        scratch = Path(scratch)
        data_dir = scratch / "data"
        data_dir.mkdir()
        (data_dir / "mnist.npz").symlink_to(args.data.resolve())
        latency_spec = job_spec(1, args.steps_per_execution)
        training_spec = job_spec(epochs, args.steps_per_execution)

        latency = {}
        for mode in ("cold", "warm"):
            server = Server(scratch / f"state-{mode}", data_dir, warm_worker=mode == "warm")
            samples = []
            try:
                for _ in range(latency_samples):
                    server.wait_idle()
                    if mode == "warm":
                        server.wait_for_warm_worker()
                    samples.append(first_progress_seconds(server, latency_spec))
                    print(f"first progress, {mode}: {samples[-1]:.2f} s", file=sys.stderr)
            finally:
                server.close()
            latency[mode] = {"median": statistics.median(samples), "samples": samples}

        server = Server(scratch / "state-throughput", data_dir, warm_worker=False)
        library, service = [], []
        try:
            for _ in range(rounds):
                library.append(best_rate(library_epochs(data_dir, training_spec)))
                print(f"library: {library[-1]:.0f} samples/s", file=sys.stderr)
                service.append(best_rate(service_epochs(server, training_spec)))
                print(f"service: {service[-1]:.0f} samples/s", file=sys.stderr)
        finally:
            server.close()

    ratio = max(service) / max(library)
    results = {
        "throughput": {
            "library": {"samples_per_sec": max(library), "rounds": library},
            "service": {"samples_per_sec": max(service), "rounds": service},
            "service/library": ratio,
        },
        "first_progress_seconds": latency,
        "targets": {
            "service/library >=": THROUGHPUT_TARGET,
            "warm first progress <= s": WARM_FIRST_PROGRESS_TARGET,
        },
        "met": {
            "throughput": ratio >= THROUGHPUT_TARGET,
            "warm_first_progress": latency["warm"]["median"] <= WARM_FIRST_PROGRESS_TARGET,
        },
        "config": {
            "model": "784-512relu-10softmax",
            "optimizer": "sgd",
            "batch_size": 128,
            "epochs": epochs,
            "steps_per_execution": args.steps_per_execution or "epoch",
            "quick": args.quick,
        },
        "machine": machine(),
    }
    publish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
