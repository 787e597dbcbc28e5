"""A real TrainingServer on port 0 with a real client, for the service tests."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import grpc
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from service.api.server import ServerConfig, TrainingServer

TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELED)


def layers(*units_and_activations: tuple[int, str]) -> list[pb.LayerSpec]:
    return [pb.LayerSpec(units=u, activation=a) for u, a in units_and_activations]


def job_spec(**overrides) -> pb.JobSpec:
    """A small valid job on the synthetic set (784 features, 10 classes)."""
    fields = {
        "layers": layers((64, "relu"), (10, "softmax")),
        "initializer": "glorot",
        "optimizer": pb.OptimizerSpec(name="rmsprop", learning_rate=1e-3),
        "batch_size": 128,
        "epochs": 1,
        "dataset": "synthetic",
        "strategy": pb.StrategySpec(name="cpu"),
        "seed": 1,
    }
    fields.update(overrides)
    return pb.JobSpec(**fields)


class RunningServer:
    """A server plus a stub; `restart()` brings up a new server on the same state."""

    def __init__(self, state_dir: Path, **config):
        defaults = {"port": 0, "metrics_port": None, "gpu_inventory": ()}
        self.config = ServerConfig(state_dir=state_dir, **{**defaults, **config})
        self.server: TrainingServer | None = None
        self.channel: grpc.Channel | None = None
        self.stub: training_pb2_grpc.TrainingServiceStub | None = None
        self.start()

    def start(self) -> None:
        self.server = TrainingServer(self.config)
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = training_pb2_grpc.TrainingServiceStub(self.channel)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.server is not None:
            self.server.stop(grace=1.0)
        self.server = self.channel = self.stub = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def manager(self):
        return self.server.manager

    def submit(self, spec: pb.JobSpec | None = None, request_id: str = "") -> pb.Job:
        request = pb.SubmitJobRequest(spec=spec or job_spec(), request_id=request_id)
        return self.stub.SubmitJob(request, timeout=30)

    def events(self, job_id: str, after: int = 0, timeout: float = 300) -> list[pb.JobEvent]:
        """Every event of the job after `after`, until the stream ends with the job."""
        stream = self.stub.WatchJob(
            pb.WatchJobRequest(job_id=job_id, after_sequence=after), timeout=timeout
        )
        return list(stream)

    def wait_for(self, job_id: str, states: Iterable[int] = TERMINAL, timeout=300) -> pb.Job:
        """Poll GetJob until the job is in one of `states`."""
        states = tuple(states)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
            if job.state in states:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {job}")

    def stored_job_count(self) -> int:
        return sum(self.manager.store.count_by_state().values())

    def job_dirs(self) -> list[str]:
        return sorted(os.listdir(self.manager.store.jobs_dir))


def child_worker_pids() -> set[int]:
    """PIDs of this process's children that are job or warm worker processes.

    The inference worker, which stays up between Evaluate and Predict
    requests, is not among them: see `inference_worker_pids`.
    """
    return {pid for pid, command in _child_workers() if b"--model-cache" not in command}


def inference_worker_pids() -> set[int]:
    """PIDs of this process's children that are inference workers (service.worker.serving)."""
    return {pid for pid, command in _child_workers() if b"--model-cache" in command}


def _child_workers() -> list[tuple[int, bytes]]:
    """(pid, command line) of this process's children that run service.worker.entry."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"service.worker.entry" in cmdline:
            found.append((int(entry.name), cmdline))
    return found


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()
