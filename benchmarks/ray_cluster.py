"""A real two-node Ray cluster in a network namespace of its own, and what follows jobs on it.

Used by tests/test_ray_cluster.py (with tests/ray_scenario_main.py inside the
namespace) and by benchmarks/ray_scaling.py.

The namespace holds only a loopback interface; the head node listens on
127.0.0.2 and the worker node on 127.0.0.3, so the two "hosts" have two
addresses (TensorFlow's collective server binds 0.0.0.0: one address could
not hold two) and nothing reaches or collides with the machine's own ports.

Each node is a `ray start --block` process: ending it ends its node. The
teardown ends those, then every process still in the namespace (all started
here: a namespace has only what was started in it), then the namespace.
`ray stop` is not used: it ends every Ray process of the machine, other
people's clusters too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ntrain.v1 import training_pb2 as pb

from ntrain.client import Client
from service.cli.local_server import LocalServer

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"
RAY_ADDRESS = f"http://{HEAD_IP}:8265"
STOP_SECONDS = 20.0


class NetnsRayCluster:
    """Start with `start()`; always `stop()` (a finally, or a fixture's teardown)."""

    def __init__(self, work_dir: Path):
        self.namespace = f"ntrain-ray-{os.getpid()}"
        self.work_dir = work_dir
        # Ray's session folder holds its Unix sockets, whose paths may not pass 107
        # bytes; under pytest's (or xdist's) deep tmp_path they would. So it is
        # short, and removed by stop().
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ntrain-ray-", dir="/tmp"))
        self.nodes: list[subprocess.Popen] = []
        self._created = False
        bin_dir = str(Path(sys.executable).parent)
        # The cluster's interpreter is this venv's: Ray Jobs runs `python -m service.driver`.
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            "CUDA_VISIBLE_DEVICES": "",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        self.ray = str(Path(bin_dir) / "ray")

    def in_namespace(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *command]

    def start(self) -> None:
        subprocess.run(["ip", "netns", "add", self.namespace], check=True)
        self._created = True
        subprocess.run(self.in_namespace("ip", "link", "set", "lo", "up"), check=True)
        common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats", "--block"]
        self._node(
            "head",
            "--head",
            f"--node-ip-address={HEAD_IP}",
            "--port=6379",
            f"--dashboard-host={HEAD_IP}",
            "--dashboard-port=8265",
            f"--temp-dir={self.temp_dir}",
            *common,
        )
        self._node(
            "worker",
            f"--address={HEAD_IP}:6379",
            f"--node-ip-address={WORKER_IP}",
            # The head's defaults are taken in this namespace: the worker node needs others.
            "--dashboard-agent-listen-port=52366",
            "--dashboard-agent-grpc-port=52367",
            "--metrics-export-port=52368",
            "--runtime-env-agent-port=52369",
            *common,
        )

    def _node(self, name: str, *arguments: str) -> None:
        log = open(self.work_dir / f"ray-{name}.log", "wb")  # noqa: SIM115 (kept by the node)
        self.nodes.append(
            subprocess.Popen(
                self.in_namespace(self.ray, "start", *arguments),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        if name == "head":  # the worker node joins a head that answers
            time.sleep(0.5)

    def pids(self) -> list[int]:
        """Every process in the namespace."""
        if not self._created:
            return []
        found = subprocess.run(
            ["ip", "netns", "pids", self.namespace], capture_output=True, text=True
        )
        return [int(pid) for pid in found.stdout.split()]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for node in self.nodes:
            try:
                node.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(5)
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.pids():  # what the nodes left: only this namespace's own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._created:
            subprocess.run(["ip", "netns", "delete", self.namespace], check=False)
            self._created = False
        # Its logs stay beside the scenario's, for a failure's post-mortem.
        logs = self.temp_dir / "session_latest" / "logs"
        if logs.is_dir():
            shutil.copytree(logs, self.work_dir / "ray-logs", dirs_exist_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# -- a scenario on the cluster: its data, its run, its server -----------------------------


def write_blobs(work: Path) -> None:
    """The scenarios' data set: 8192 synthetic examples of 64 features, `work/data/blobs.npz`."""
    import numpy as np

    from naive_model.data import synthetic_dataset

    (work / "data").mkdir(exist_ok=True)
    blobs = synthetic_dataset(num_train=8192, num_test=512, input_size=64, seed=5)
    np.savez(
        work / "data" / "blobs.npz",
        x_train=blobs.x_train,
        y_train=blobs.y_train,
        x_test=blobs.x_test,
        y_test=blobs.y_test,
    )


def run_inside(work: Path, command: list[str], out: Path, timeout: float):
    """Start a cluster, run `command RAY_ADDRESS WORK OUT` in its namespace, stop it.

    Returns:
        The finished process (output captured) and whether every process of the
        namespace was gone after the stop.
    """
    cluster = NetnsRayCluster(work)
    try:
        cluster.start()
        done = subprocess.run(
            cluster.in_namespace(*command, RAY_ADDRESS, str(work), str(out)),
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        cluster.stop()
    return done, not cluster.pids()


def ray_server(work: Path, ray_address: str) -> LocalServer:
    """`ntrain serve --ray-address` inside the namespace, on the scenario's data and state."""
    return LocalServer(
        work / "state",
        [
            f"--data-dir={work / 'data'}",
            f"--ray-address={ray_address}",
            "--no-metrics",
            "--no-warm-worker",
        ],
        log_path=work / "server.log",
    )


# -- following multi_worker jobs on the cluster ----------------------------------------


def spec(epochs: int) -> dict:
    """A small multi_worker job over both hosts, as JSON for `Client.submit`."""
    return {
        "layers": [{"units": 32, "activation": "relu"}, {"units": 10, "activation": "softmax"}],
        "initializer": "glorot",
        "optimizer": {"name": "adam", "learningRate": 0.01},
        "batchSize": 64,
        "epochs": epochs,
        "stepsPerExecution": 8,
        "dataset": "blobs.npz",
        "strategy": {"name": "multi_worker", "hosts": 2},
        "seed": 3,
        "maxRestarts": 1,
    }


def ray_logs(ray_address: str, job_id: str) -> str:
    with urllib.request.urlopen(f"{ray_address}/api/jobs/{job_id}/logs", timeout=10) as answer:
        return json.loads(answer.read())["logs"]


def follow(client: Client, job_id: str, submitted: float, on_event=None) -> dict:
    """Watch the job to its end; what came, and when."""
    seen: dict = {
        "progress": 0,
        "progress_steps": [],
        "epochs": [],
        "epoch_seconds": [],
        "states": [],
        "first_progress_s": None,
    }
    for event in client.watch(job_id):
        payload = event.payload
        if isinstance(payload, pb.Progress):
            seen["progress"] += 1
            seen["progress_steps"].append(payload.step)
            if seen["first_progress_s"] is None:
                seen["first_progress_s"] = time.monotonic() - submitted
        elif isinstance(payload, pb.EpochSummary):
            seen["epochs"].append(payload.epoch)
            seen["epoch_seconds"].append(round(payload.seconds, 3))
        elif isinstance(payload, pb.StateTransition):
            seen["states"].append(pb.JobState.Name(payload.state))
        if on_event is not None:
            on_event(payload)
    seen["end_s"] = time.monotonic() - submitted
    return seen
