"""What wrong credentials cost a real server: CPU, peak memory, Health's latency.

    python -m benchmarks.auth_flood [--code DIR] [--seconds 10] [--clients 8] [--attacks A,B]
                                    [--burst 96] [--principals 4] [--json FILE]

A server (`ntrain serve`, loopback only, no warm worker) is started from the
code in DIR (default: this checkout; pass an exported older commit to measure
it before a change), with a token file of `--principals` principals made by
that code's own `ntrain token new`, and a metrics password file. Then, each
attack on a fresh server so that its peak memory is its own:

- flood: `--clients` client processes send GetServerInfo with wrong tokens back
  to back for `--seconds`, while another calls Health every 50 ms;
- burst: `--burst` wrong-token calls at once;
- metrics: 20 scrapes each with a wrong password for the existing user and for
  an unknown one, each from an address of its own in 127.0.0.0/8 (the median
  time of each: a difference names the users).

A wrong token is a real one with its last 43 characters (its 256-bit secret)
replaced, so a token format with a public identifier is looked up by it, the
worst case for the server. The server's CPU is from /proc/PID/stat and its
peak memory is VmHWM. Everything binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from benchmarks.load import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
SECRET_CHARS = 43  # token_urlsafe(32)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cli(code: Path, *args: str, stdin: str | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{code / 'proto'}"}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        input=stdin, capture_output=True, text=True, check=True, env=env, cwd=code,
    ).stdout.strip()  # fmt: skip


class Server:
    """`ntrain serve` from `code`, on loopback, in a folder of its own."""

    def __init__(self, code: Path, folder: Path, principals: int):
        self.code, self.folder = code, folder
        self.tokens = [
            _cli(
                code,
                "token",
                "new",
                f"user{i}",
                "--role",
                "viewer",
                "--auth-tokens",
                str(folder / "tokens"),
            )  # fmt: skip
            for i in range(principals)
        ]
        (folder / "users").write_text(
            f"prometheus {_cli(code, 'token', 'hash', stdin='right password')}\n"
        )
        self.metrics_port = _free_port()
        port_file = folder / "port"
        env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{code / 'proto'}"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", "0",
             "--port-file", str(port_file), "--metrics-port", str(self.metrics_port),
             "--state-dir", str(folder / "state"), "--no-warm-worker",
             "--auth-tokens", str(folder / "tokens"), "--metrics-basic-auth",
             str(folder / "users")],
            env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=open(folder / "log", "w"),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the server did not start: {(folder / 'log').read_text()}")
            time.sleep(0.1)
        self.address = f"127.0.0.1:{port_file.read_text().strip()}"
        time.sleep(1.0)  # the device probe's child has come and gone

    def wrong_token(self, index: int) -> str:
        token = self.tokens[index % len(self.tokens)]
        return token[:-SECRET_CHARS] + secrets.token_urlsafe(32)

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def _flood_client(address: str, tokens: list[str], seconds: float, counts) -> None:
    channel = grpc.insecure_channel(address)
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    calls, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        token = tokens[calls % len(tokens)]
        try:
            stub.GetServerInfo(
                pb.GetServerInfoRequest(),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
        except grpc.RpcError:
            pass
        calls += 1
    counts.put(calls)
    channel.close()


def _health_latencies(address: str, stop: threading.Event) -> list[float]:
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    latencies = []
    while not stop.wait(0.05):
        started = time.perf_counter()
        health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        latencies.append(time.perf_counter() - started)
    channel.close()
    return latencies


def _during(server: Server, attack) -> dict:
    """Run `attack()`; the server's CPU, peak memory and Health's latency meanwhile."""
    idle = _health_latencies_for(server, 2.0)
    rss_before, cpu_before = server.rss_bytes(), cpu_seconds(server.process.pid)
    stop, latencies = threading.Event(), []
    prober = threading.Thread(
        target=lambda: latencies.extend(_health_latencies(server.address, stop))
    )
    prober.start()
    started = time.monotonic()
    details = attack()
    wall = time.monotonic() - started
    stop.set()
    prober.join()
    time.sleep(0.5)
    return {
        **details,
        "wall_seconds": round(wall, 2),
        "server_cpu_seconds": round(cpu_seconds(server.process.pid) - cpu_before, 2),
        "rss_before_mb": round(rss_before / 1e6),
        "peak_rss_mb": round(server.peak_rss_bytes() / 1e6),
        "rss_after_mb": round(server.rss_bytes() / 1e6),
        "health_median_ms_idle": round(1000 * statistics.median(idle), 2),
        "health_median_ms_during": round(1000 * statistics.median(latencies), 2),
    }


def _health_latencies_for(server: Server, seconds: float) -> list[float]:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return _health_latencies(server.address, stop)


def flood(server: Server, clients: int, seconds: float) -> dict:
    def attack() -> dict:
        spawn = multiprocessing.get_context("spawn")  # no fork of a process using gRPC
        counts = spawn.Queue()
        tokens = [server.wrong_token(i) for i in range(64)]
        workers = [
            spawn.Process(target=_flood_client, args=(server.address, tokens, seconds, counts))
            for _ in range(clients)
        ]
        for worker in workers:
            worker.start()
        calls = sum(counts.get(timeout=seconds + 120) for _ in workers)
        for worker in workers:
            worker.join()
        return {"clients": clients, "calls": calls}

    return _during(server, attack)


def burst(server: Server, calls: int, rounds: int = 1) -> dict:
    def attack() -> dict:
        channel = grpc.insecure_channel(server.address)
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        for round_ in range(rounds):
            futures = [
                stub.GetServerInfo.future(
                    pb.GetServerInfoRequest(),
                    metadata=[("authorization", f"Bearer {server.wrong_token(i + round_)}")],
                    timeout=60,
                )
                for i in range(calls)
            ]
            for future in futures:
                try:
                    future.result()
                except grpc.RpcError:
                    pass
        channel.close()
        return {"concurrent_calls": calls, "rounds": rounds}

    return _during(server, attack)


def metrics_timing(server: Server, tries: int = 20) -> dict:
    """Median time of a wrong password, for the existing user and for unknown ones.

    Each try comes from an address of its own in 127.0.0.0/8, so the delay a
    server may put on an address's repeated refusals does not hide the check.
    """

    def scrape(user: str, source: str) -> float:
        connection = http.client.HTTPConnection(
            "127.0.0.1", server.metrics_port, timeout=30, source_address=(source, 0)
        )
        credentials = base64.b64encode(f"{user}:wrong password".encode()).decode()
        started = time.perf_counter()
        connection.request("GET", "/metrics", headers={"Authorization": f"Basic {credentials}"})
        status = connection.getresponse().status
        elapsed = time.perf_counter() - started
        connection.close()
        assert status == 401, status
        return elapsed

    existing, unknown = [], []
    for i in range(tries):
        existing.append(scrape("prometheus", f"127.0.1.{2 * i + 1}"))
        unknown.append(scrape(f"nobody{i}", f"127.0.1.{2 * i + 2}"))
    return {
        "existing_user_median_ms": round(1000 * statistics.median(existing), 2),
        "unknown_user_median_ms": round(1000 * statistics.median(unknown), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", type=Path, default=ROOT)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--burst", type=int, default=96)
    parser.add_argument("--principals", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--attacks", default="flood,burst,metrics", help="which, comma-separated")
    args = parser.parse_args(argv)
    results: dict = {"code": str(args.code.resolve())}
    for name, attack in [
        ("flood", lambda server: flood(server, args.clients, args.seconds)),
        ("burst", lambda server: burst(server, args.burst)),
        ("metrics", metrics_timing),
    ]:
        if name not in args.attacks.split(","):
            continue
        with tempfile.TemporaryDirectory(prefix="auth-flood-") as folder:
            server = Server(args.code.resolve(), Path(folder), args.principals)
            try:
                results[name] = attack(server)
            finally:
                server.stop()
        print(name, json.dumps(results[name]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
