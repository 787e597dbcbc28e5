"""The server under load while it trains: latency, errors, CPU per RPC, training slowdown.

    python -m benchmarks.load [--json benchmarks/results/load.json] [--quick]

A real `ntrain serve` process trains MNIST (the book's network, SGD 1e-3,
batch 128, CPU) for the whole run. The run alternates phases, idle, load,
load, idle (ABBA), each `--phase-seconds` long:

- idle: only the training and one watcher of it (which times the training).
- load: client processes of their own send `--rps` unary calls a second in
  an open loop (GetJob, ListJobs, GetServerInfo, Health.Check in turn) and
  hold `--watchers` WatchJob streams on the training job, reading them.
- unary, watch: each half of the load alone, so the server's CPU can be
  told apart: per unary RPC (unary phases) and per streamed event (watch).
  The full run's order is idle, unary, watch, load, load, watch, unary, idle.

Reported: unary latency p50/p99 and errors; the training rate under load
against the idle phases of the same run (the paired ratio); the server
process's CPU per unary RPC (its CPU over the load phases, less the idle
phases' rate, over the calls it answered); the client processes' own CPU
share of the host (they share the two cores with the training); and the
closed-loop maximum RPS the server sustains (no training), with its CPU per
RPC. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from benchmarks.report import SHARED_MNIST, publish
from service.cli.local_server import LocalServer
from service.cli.specs import book_job_spec

TARGETS = {"cpu_ms_per_rpc": 0.5, "p99_ms": 50.0, "training_drop": 0.10}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _run_threads(target, count: int) -> None:
    """Run target(0) .. target(count - 1) on threads of their own, and wait for all."""
    workers = [threading.Thread(target=target, args=(slot,)) for slot in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def unary_client(address: str, job_id: str, rps: float, seconds: float, threads: int, results):
    """Open loop: call i is due at start + i / rps, whatever the answers take."""
    channel = grpc.insecure_channel(address)
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    calls = [
        lambda: stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10),
        lambda: stub.ListJobs(pb.ListJobsRequest(page_size=20), timeout=10),
        lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10),
        lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10),
    ]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.monotonic()
    total = int(rps * seconds)

    def run(offset: int) -> None:
        for index in range(offset, total, threads):
            delay = start + index / rps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            began = time.perf_counter()
            try:
                calls[index % len(calls)]()
                with lock:
                    latencies.append(time.perf_counter() - began)
            except grpc.RpcError as error:
                with lock:
                    errors.append(error.code().name)

    _run_threads(run, threads)
    channel.close()
    results.put({"latencies": latencies, "errors": errors, "cpu": _own_cpu()})


def closed_loop_client(address: str, job_id: str, seconds: float, threads: int, results):
    channel = grpc.insecure_channel(address)
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    counts = [0] * threads
    deadline = time.monotonic() + seconds

    def run(slot: int) -> None:
        while time.monotonic() < deadline:
            stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
            counts[slot] += 1

    _run_threads(run, threads)
    channel.close()
    results.put({"calls": sum(counts), "cpu": _own_cpu()})


def watcher_client(address: str, job_id: str, streams: int, seconds: float, results):
    channel = grpc.insecure_channel(address)
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    received = [0] * streams
    errors: list[str] = []

    def follow(slot: int) -> None:
        call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=seconds)
        try:
            for _ in call:
                received[slot] += 1
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # the planned end
                errors.append(error.code().name)

    _run_threads(follow, streams)
    channel.close()
    results.put({"events": sum(received), "errors": errors, "cpu": _own_cpu()})


class TrainingClock:
    """Follows the training job's progress events, to measure its rate in a window."""

    def __init__(self, stub, job_id: str):
        self.samples: list[tuple[float, int]] = []  # (monotonic time, examples so far)
        self._call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id))
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            for event in self._call:
                if event.HasField("progress"):
                    self.samples.append((time.monotonic(), event.progress.examples))
        except grpc.RpcError:
            pass

    def rate(self, start: float, end: float) -> float:
        inside = [(t, n) for t, n in self.samples if start <= t <= end]
        if len(inside) < 2:
            return 0.0
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def stop(self) -> None:
        self._call.cancel()


def run_phase(kind: str, server: LocalServer, job_id: str, args) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    clients = []
    if kind in ("load", "unary"):
        threads = max(4, int(args.rps // 10))
        clients.append(
            context.Process(
                target=unary_client,
                args=(server.address, job_id, args.rps, args.phase_seconds, threads, results),
            )
        )
    if kind in ("load", "watch"):
        clients.append(
            context.Process(
                target=watcher_client,
                args=(server.address, job_id, args.watchers, args.phase_seconds, results),
            )
        )
    cpu_before = cpu_seconds(server.process.pid)
    start = time.monotonic()
    for client in clients:
        client.start()
    answers = [results.get(timeout=args.phase_seconds + 120) for _ in clients]
    for client in clients:
        client.join()
    if not clients:
        time.sleep(args.phase_seconds)
    end = time.monotonic()
    phase = {
        "kind": kind,
        "seconds": end - start,
        "server_cpu": cpu_seconds(server.process.pid) - cpu_before,
        "client_cpu": sum(answer["cpu"] for answer in answers),
        "start": start,
        "end": end,
    }
    for answer in answers:
        if "latencies" in answer:
            phase["latencies"] = answer["latencies"]
            phase["unary_errors"] = answer["errors"]
        else:
            phase["watch_events"] = answer["events"]
            phase["watch_errors"] = answer["errors"]
    return phase


def closed_loop(
    server: LocalServer, job_id: str, seconds: float, processes: int, threads: int
) -> dict:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    clients = [
        context.Process(
            target=closed_loop_client, args=(server.address, job_id, seconds, threads, results)
        )
        for _ in range(processes)
    ]
    cpu_before = cpu_seconds(server.process.pid)
    start = time.monotonic()
    for client in clients:
        client.start()
    answers = [results.get(timeout=seconds + 120) for _ in clients]
    for client in clients:
        client.join()
    elapsed = time.monotonic() - start
    calls = sum(answer["calls"] for answer in answers)
    server_cpu = cpu_seconds(server.process.pid) - cpu_before
    return {
        "rps": calls / elapsed,
        "calls": calls,
        "server_cpu_ms_per_rpc": 1e3 * server_cpu / calls if calls else 0.0,
        "clients": processes * threads,
    }


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else 0.0


def run(args) -> dict:
    load_before = os.getloadavg()
    data_dir = SHARED_MNIST.parent if SHARED_MNIST.is_file() and not args.quick else None
    dataset = "mnist" if data_dir is not None else "synthetic"
    with tempfile.TemporaryDirectory(prefix="ntrain-load-") as state:
        data_args = [] if data_dir is None else ["--data-dir", str(data_dir)]
        server = LocalServer(Path(state), [*data_args, "--no-warm-worker"])
        try:
            channel = grpc.insecure_channel(server.address)
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            spec = book_job_spec(
                pb.JobSpec(
                    dataset=dataset,
                    epochs=100_000,
                    optimizer=pb.OptimizerSpec(name="sgd", learning_rate=1e-3),
                    strategy=pb.StrategySpec(name="cpu"),
                    steps_per_execution=50,
                )
            )
            job = stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=60)
            clock = TrainingClock(stub, job.job_id)
            while not clock.samples:  # training runs: the tracing is behind us
                time.sleep(0.1)
            time.sleep(2.0)
            phases = [run_phase(kind, server, job.job_id, args) for kind in args.order]
            clock.stop()
            stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=60)
            most = closed_loop(server, job.job_id, args.phase_seconds, 2, args.closed_threads)
            channel.close()
        finally:
            server.stop()
    for phase in phases:
        phase["training_rate"] = clock.rate(phase.pop("start"), phase.pop("end"))
    idle = [p for p in phases if p["kind"] == "idle"]
    load = [p for p in phases if p["kind"] == "load"]
    idle_cpu_rate = sum(p["server_cpu"] for p in idle) / sum(p["seconds"] for p in idle)

    def extra_cpu(kind: str) -> float:
        """Server CPU seconds of the phases of `kind`, above the idle phases' rate."""
        return sum(
            p["server_cpu"] - idle_cpu_rate * p["seconds"] for p in phases if p["kind"] == kind
        )

    unary_calls = sum(len(p["latencies"]) for p in phases if p["kind"] == "unary")
    watch_events = sum(p["watch_events"] for p in phases if p["kind"] == "watch")
    latencies = [s for p in load for s in p["latencies"]]
    idle_rate = sum(p["training_rate"] for p in idle) / len(idle)
    load_rate = sum(p["training_rate"] for p in load) / len(load)
    load_seconds = sum(p["seconds"] for p in load)
    result = {
        "dataset": dataset,
        "rps_target": args.rps,
        "watchers": args.watchers,
        "phase_seconds": args.phase_seconds,
        "unary_calls": len(latencies),
        "unary_errors": sum(len(p.get("unary_errors", [])) for p in phases),
        "watch_errors": sum(len(p.get("watch_errors", [])) for p in phases),
        "watch_events": sum(p["watch_events"] for p in load),
        "p50_ms": 1e3 * quantile(latencies, 0.50),
        "p99_ms": 1e3 * quantile(latencies, 0.99),
        "server_cpu_ms_per_rpc": 1e3 * extra_cpu("unary") / unary_calls if unary_calls else 0.0,
        "server_cpu_ms_per_streamed_event": (
            1e3 * extra_cpu("watch") / watch_events if watch_events else 0.0
        ),
        "server_cpu_share_under_load": sum(p["server_cpu"] for p in load) / load_seconds,
        "training_rate_idle": idle_rate,
        "training_rate_load": load_rate,
        "training_drop": 1 - load_rate / idle_rate if idle_rate else 0.0,
        "client_cpu_share_of_host": sum(p["client_cpu"] for p in load)
        / (load_seconds * (os.cpu_count() or 1)),
        "closed_loop": most,
        "phases": [{k: v for k, v in p.items() if k != "latencies"} for p in phases],
        "targets": TARGETS,
        # The host's load average (1, 5, 15 min) before and after: the two
        # cores are shared, and every figure above carries that contention.
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }
    result["met"] = {
        "cpu_ms_per_rpc": result["server_cpu_ms_per_rpc"] <= TARGETS["cpu_ms_per_rpc"],
        "p99_ms": result["p99_ms"] < TARGETS["p99_ms"],
        "no_errors": result["unary_errors"] == 0 and result["watch_errors"] == 0,
        "training_drop": result["training_drop"] < TARGETS["training_drop"],
    }
    return result


def table(result: dict) -> str:
    most = result["closed_loop"]
    return "\n".join(
        [
            f"{result['rps_target']:.0f} RPS unary + {result['watchers']} watchers while "
            f"{result['dataset']} trains ({result['phase_seconds']:.0f} s phases, ABBA):",
            f"  unary calls {result['unary_calls']}, errors {result['unary_errors']} "
            f"(watch errors {result['watch_errors']}, watch events {result['watch_events']})",
            f"  latency p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms "
            f"(target < {TARGETS['p99_ms']:.0f})",
            f"  server CPU per unary RPC {result['server_cpu_ms_per_rpc']:.2f} ms "
            f"(target <= {TARGETS['cpu_ms_per_rpc']}), per streamed event "
            f"{result['server_cpu_ms_per_streamed_event']:.2f} ms; the server used "
            f"{result['server_cpu_share_under_load']:.0%} of a core under the whole load",
            f"  training {result['training_rate_idle']:.0f} -> {result['training_rate_load']:.0f} "
            f"examples/s: drop {result['training_drop']:.1%} (target < "
            f"{TARGETS['training_drop']:.0%}); the load's client processes used "
            f"{result['client_cpu_share_of_host']:.1%} of the host's CPU",
            f"  closed loop, {most['clients']} clients, no training: {most['rps']:.0f} RPS, "
            f"{most['server_cpu_ms_per_rpc']:.2f} ms server CPU per RPC",
            "  host load average before {:.1f} {:.1f} {:.1f}, after {:.1f} {:.1f} {:.1f}".format(
                *result["load_average"]["before"], *result["load_average"]["after"]
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rps", type=float, default=100.0)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--phase-seconds", type=float, default=15.0)
    parser.add_argument("--closed-threads", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="synthetic data, short phases")
    args = parser.parse_args(argv)
    args.order = ("idle", "unary", "watch", "load", "load", "watch", "unary", "idle")
    if args.quick:
        args.phase_seconds = min(args.phase_seconds, 3.0)
    result = run(args)
    publish(result, args.json)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
