"""SIGTERM to exit, with the default job: a whole epoch per compiled call.

    python -m benchmarks.shutdown [--data PATH] [--json FILE]

A server (`ntrain serve`, a child process) trains the book's network on
MNIST with every default (steps_per_execution 0: each epoch is one compiled
call). Once the job is well into an epoch, the server gets SIGTERM: the
worker sees the stop at the epoch's end (the call boundary), checkpoints,
and the server exits. Reports SIGTERM to exit beside the epoch's length,
which bounds it, and the server's exit status.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path

from ntrain.v1 import training_pb2 as pb

from benchmarks.report import SHARED_MNIST, machine, publish
from ntrain.client import Client
from service.cli.local_server import LocalServer
from service.cli.specs import book_job_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_MNIST, help="MNIST's .npz")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ntrain-shutdown-") as state:
        server = LocalServer(
            Path(state), ["--data-dir", str(args.data.parent), "--no-metrics", "--no-warm-worker"]
        )
        try:
            client = Client(server.address, timeout=60)
            spec = book_job_spec(pb.JobSpec(epochs=50, strategy=pb.StrategySpec(name="cpu")))
            job = client.submit(spec)
            epoch_seconds = None
            for event in client.watch(job.job_id):
                if isinstance(event.payload, pb.EpochSummary):
                    epoch_seconds = event.payload.seconds
                    break
            time.sleep((epoch_seconds or 1.0) / 2)  # halfway into the next epoch's call
            load = Path("/proc/loadavg").read_text().split()[:3]
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            status = server.process.wait(600)
            exit_seconds = time.monotonic() - sent
        finally:
            server.stop()
    figures = {
        "sigterm_to_exit_seconds": exit_seconds,
        "epoch_seconds": epoch_seconds,
        "exit_status": status,
        "load_average": load,
    }
    for key, value in figures.items():
        print(f"{key:26} {value}")
    publish({"machine": machine(), **figures}, args.json)


if __name__ == "__main__":
    main()
