"""What WatchJob clients that stop reading cost a server running a job.

    python -m benchmarks.slow_watchers [--code DIR] [--watchers 20] [--seconds 20]
                                       [--periods 3] [--window-bytes N] [--json FILE]
                                       [-- SERVE FLAGS...]

A server (`ntrain serve`, loopback, no warm worker) started from the code in
DIR (default: this checkout) runs one job that reports an event a step
(batch 8, one step per compiled call). Over `--seconds`, first with no
watcher, then for `--periods` periods after `--watchers` clients (a channel
each, gRPC's default options) opened WatchJob, took one event and stopped
reading (`--window-bytes` keeps their flow-control window small): the server
process's CPU seconds (/proc/PID/stat) and the job's
steps a second (its progress through GetJob), and how many of those streams
the server dropped (`--stream-send-timeout`) or ended at their age
(`--stream-max-age`). Flags after `--` go to `ntrain serve` (e.g.
--stream-max-age 10).
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

import grpc
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from benchmarks.load import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent


def _spec() -> pb.JobSpec:
    return pb.JobSpec(
        layers=[pb.LayerSpec(units=64, activation="relu"),
                pb.LayerSpec(units=10, activation="softmax")],
        optimizer=pb.OptimizerSpec(name="sgd", learning_rate=0.01),
        batch_size=8, epochs=100_000, dataset="synthetic", steps_per_execution=1,
        strategy=pb.StrategySpec(name="cpu"), seed=1,
    )  # fmt: skip


def _measure(stub, job_id: str, pid: int, seconds: float) -> dict:
    step = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30).progress.step
    cpu, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    steps = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30).progress.step - step
    return {
        "server_cpu_seconds": round(cpu_seconds(pid) - cpu, 2),
        "server_cpu_share": round((cpu_seconds(pid) - cpu) / wall, 3),
        "steps_per_second": round(steps / wall, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", type=Path, default=ROOT)
    parser.add_argument("--watchers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--periods", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--window-bytes", type=int, default=None,
        help="watchers whose HTTP/2 window stays this small (no BDP probing); default: "
        "gRPC's own, which BDP probing grows to megabytes",
    )  # fmt: skip
    parser.add_argument("serve_flags", nargs="*")
    args = parser.parse_args(argv)
    code = args.code.resolve()
    with tempfile.TemporaryDirectory(prefix="slow-watchers-") as folder:
        port_file = Path(folder) / "port"
        env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{code / 'proto'}"}
        log = open(Path(folder) / "log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--port-file",
             str(port_file), "--no-metrics", "--state-dir", f"{folder}/state",
             "--no-warm-worker", *args.serve_flags],
            env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        try:
            while not port_file.exists() or not port_file.read_text().strip():
                assert server.poll() is None, (Path(folder) / "log").read_text()
                time.sleep(0.1)
            address = f"127.0.0.1:{port_file.read_text().strip()}"
            channel = grpc.insecure_channel(address)
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            job = stub.SubmitJob(pb.SubmitJobRequest(spec=_spec()), timeout=60)
            while stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=30).progress.step < 1:
                time.sleep(0.5)
            time.sleep(5.0)  # past tracing
            results = {
                "code": str(code), "serve_flags": args.serve_flags,
                "window_bytes": args.window_bytes,
            }  # fmt: skip
            results["no_watchers"] = _measure(stub, job.job_id, server.pid, args.seconds)
            print("no watchers", json.dumps(results["no_watchers"]), flush=True)
            watchers = []
            options = []
            if args.window_bytes is not None:
                options = [
                    ("grpc.http2.bdp_probe", 0),
                    ("grpc.http2.lookahead_bytes", args.window_bytes),
                ]
            for _ in range(args.watchers):
                watcher_channel = grpc.insecure_channel(address, options=options)
                call = training_pb2_grpc.TrainingServiceStub(watcher_channel).WatchJob(
                    pb.WatchJobRequest(job_id=job.job_id), timeout=3600
                )
                next(call)  # open, then never read again
                watchers.append((watcher_channel, call))
            results["stalled_watchers"] = args.watchers
            for period in range(args.periods):
                name = f"watchers_{period * args.seconds:.0f}_{(period + 1) * args.seconds:.0f}s"
                results[name] = _measure(stub, job.job_id, server.pid, args.seconds)
                print(name, json.dumps(results[name]), flush=True)
            server_log = (Path(folder) / "log").read_text()
            results["dropped_log_lines"] = server_log.count("dropped a WatchJob stream")
            results["aged_log_lines"] = server_log.count("at its age limit")
            print("dropped", results["dropped_log_lines"], "aged", results["aged_log_lines"])
            for watcher_channel, call in watchers:
                call.cancel()
                watcher_channel.close()
            stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=60)
            channel.close()
        finally:
            server.terminate()
            server.wait(timeout=120)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
