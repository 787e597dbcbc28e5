"""Server CPU per call of grpcio's servers: the threaded one against grpc.aio.

    python -m benchmarks.grpc_server_cost [--seconds 10] [--processes 2] [--threads 8]
                                          [--rps 100]

Each server serves only the standard Health service, in a process of its own,
and the same clients (processes of their own, `--threads` threads each)
call Health.Check for `--seconds`: back to back (a closed loop), or with
`--rps` at that total rate (an open loop, as benchmarks.load's). The
server's CPU comes from its own /proc/<pid>/stat over that window, and is
also given less its rate over 3 idle seconds before (its pollers). Servers:

- sync: `grpc.server` with a thread pool, `grpc_health.v1.health.HealthServicer`
  (ntrain's server);
- aio: `grpc.aio.server`, the asyncio `grpc_health.v1.health.aio.HealthServicer`;
- aio-migrated: `grpc.aio.server` running the synchronous HealthServicer in its
  `migration_thread_pool` (what a handler that stays synchronous costs there).

Nothing of ntrain runs here: this is the floor each server kind puts under
every RPC. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from benchmarks.load import _own_cpu, _run_threads, cpu_seconds

KINDS = ("sync", "aio", "aio-migrated")
POOL_THREADS = 32
IDLE_SECONDS = 3.0


def _serve_sync(ports, stop) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=POOL_THREADS))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stop.wait()
    server.stop(0).wait()


async def _serve_aio(ports, stop, migrated: bool) -> None:
    pool = futures.ThreadPoolExecutor(max_workers=POOL_THREADS)
    server = grpc.aio.server(migration_thread_pool=pool)
    servicer = health.HealthServicer() if migrated else health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    await asyncio.to_thread(stop.wait)
    await server.stop(0)
    pool.shutdown()


def serve(kind: str, ports, stop) -> None:
    if kind == "sync":
        _serve_sync(ports, stop)
    else:
        asyncio.run(_serve_aio(ports, stop, migrated=kind == "aio-migrated"))


def call_health(address: str, seconds: float, threads: int, rps: float | None, results) -> None:
    """Closed loop (rps None: each thread calls again at once) or open loop at `rps`."""
    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    stub.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True)
    counts = [0] * threads
    errors: list[str] = []
    start = time.monotonic()
    deadline = start + seconds

    def run(slot: int) -> None:
        index = slot
        while time.monotonic() < deadline:
            if rps is not None:  # call `index` is due at start + index / rps
                delay = start + index / rps - time.monotonic()
                index += threads
                if delay > 0:
                    time.sleep(delay)
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                counts[slot] += 1
            except grpc.RpcError as error:
                errors.append(error.code().name)

    _run_threads(run, threads)
    channel.close()
    results.put({"calls": sum(counts), "errors": errors, "cpu": _own_cpu()})


def measure(kind: str, seconds: float, processes: int, threads: int, rps: float | None) -> dict:
    context = multiprocessing.get_context("spawn")
    ports, stop, results = context.Queue(), context.Event(), context.Queue()
    server = context.Process(target=serve, args=(kind, ports, stop))
    server.start()
    try:
        address = f"127.0.0.1:{ports.get(timeout=60)}"
        clients = [
            context.Process(
                target=call_health,
                args=(address, seconds, threads, None if rps is None else rps / processes, results),
            )
            for _ in range(processes)
        ]
        assert server.pid is not None
        # The server's own background (its pollers) with no calls, to subtract.
        idle_before, idle_start = cpu_seconds(server.pid), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle_share = (cpu_seconds(server.pid) - idle_before) / (time.monotonic() - idle_start)
        cpu_before, start = cpu_seconds(server.pid), time.monotonic()
        for client in clients:
            client.start()
        answers = [results.get(timeout=seconds + 120) for _ in clients]
        server_cpu, elapsed = cpu_seconds(server.pid) - cpu_before, time.monotonic() - start
        for client in clients:
            client.join()
    finally:
        stop.set()
        server.join(30)
    calls = sum(answer["calls"] for answer in answers)
    return {
        "kind": kind,
        "calls": calls,
        "errors": sum(len(answer["errors"]) for answer in answers),
        "rps": calls / elapsed,
        "server_cpu_ms_per_call": 1e3 * server_cpu / calls if calls else 0.0,
        "server_cpu_ms_per_call_above_idle": (
            1e3 * (server_cpu - idle_share * elapsed) / calls if calls else 0.0
        ),
        "server_idle_share": idle_share,
        "server_cpu_share": server_cpu / elapsed,
        "client_cpu_ms_per_call": 1e3 * sum(a["cpu"] for a in answers) / calls if calls else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rps", type=float, default=None, help="open loop at this total rate")
    parser.add_argument("--rounds", type=int, default=2, help="each kind this many times, ABAB")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args(argv)
    rows = []
    for _ in range(args.rounds):
        for kind in args.kinds:
            row = measure(kind, args.seconds, args.processes, args.threads, args.rps)
            rows.append(row)
            print(
                f"{row['kind']:>13}: {row['calls']:6d} calls ({row['errors']} errors), "
                f"{row['rps']:6.0f} RPS, server CPU {row['server_cpu_ms_per_call']:.3f} ms/call "
                f"({row['server_cpu_ms_per_call_above_idle']:.3f} above its idle "
                f"{row['server_idle_share']:.1%}; {row['server_cpu_share']:.0%} of a core), "
                f"client CPU {row['client_cpu_ms_per_call']:.3f} ms/call",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
