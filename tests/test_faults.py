"""Faults against a real `ntrain serve` process: kill -9, SIGTERM, a second server.

Each kill is of a process this test started, by its pid. Figures (work lost,
time to resume, accuracy against an uninterrupted run) are printed; run with
`-s` to see them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import REPO_ROOT
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from service.cli.local_server import LocalServer
from service.cli.specs import book_job_spec

pytestmark = pytest.mark.slow

# One MNIST epoch in compiled calls of 20 steps, checkpointed every second
# between calls: a kill lands mid-epoch with a recent checkpoint behind it.
SPEC = book_job_spec(
    pb.JobSpec(epochs=1, steps_per_execution=20, strategy=pb.StrategySpec(name="cpu"), seed=3)
)
STEPS_PER_EPOCH = 60000 // 128


class ServeProcess(LocalServer):
    """The demo's `ntrain serve` process, without metrics or a warm worker, and a client."""

    def __init__(self, state_dir: Path, data_dir: Path, *extra: str):
        super().__init__(
            state_dir, ["--data-dir", str(data_dir), "--no-metrics", "--no-warm-worker", *extra]
        )
        self.channel = grpc.insecure_channel(self.address)
        self.stub = training_pb2_grpc.TrainingServiceStub(self.channel)

    def end(self, signum: int, timeout: float = 60) -> int:
        self.channel.close()
        self.process.send_signal(signum)
        return self.process.wait(timeout)


def _uninterrupted_accuracy(mnist_path: Path) -> float:
    """The same job with the library in this process: what the service must match."""
    from naive_model.config import StrategyConfig
    from naive_model.data import load_mnist
    from naive_model.distribute import make_strategy
    from naive_model.loop import run_training
    from naive_model.trainer import Trainer
    from service.api.convert import job_spec_from_proto

    config = job_spec_from_proto(SPEC).train
    trainer = Trainer(config, load_mnist(mnist_path), make_strategy(StrategyConfig(kind="cpu")))
    return run_training(trainer).test_accuracy


def _progress_until(stub, job_id: str, step_in_epoch: int) -> None:
    """Follow the job until its progress passes `step_in_epoch`."""
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300):
        if event.HasField("progress") and event.progress.step_in_epoch >= step_in_epoch:
            return
    raise AssertionError("the job ended before it got there")


def _resume_and_finish(tmp_path, mnist_path, job_id: str) -> dict:
    restart_at = time.monotonic()
    server = ServeProcess(tmp_path, mnist_path.parent)
    try:
        seen_restart, first_progress = False, None
        for event in server.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300):
            change = event.state_change
            if event.HasField("state_change") and "after a server restart" in change.reason:
                seen_restart = True
            elif seen_restart and event.HasField("progress") and first_progress is None:
                first_progress = event.progress
                resume_seconds = time.monotonic() - restart_at
        job = server.stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30)
        full = list(server.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=60))
    finally:
        assert server.end(signal.SIGTERM) == 0
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.failure_reason
    assert first_progress is not None
    sequences = [e.sequence for e in full]
    assert sequences == list(range(1, len(full) + 1))  # no gap, no repeat over the restart
    return {
        "job": job,
        # The first call of a worker runs FIRST_CALL_STEPS (1) step.
        "resumed_from_step": first_progress.step_in_epoch - 1,
        "resume_seconds": resume_seconds,
    }


def test_kill_9_of_the_server_mid_epoch_resumes_to_the_same_accuracy(tmp_path, mnist_path):
    server = ServeProcess(tmp_path, mnist_path.parent, "--checkpoint-seconds", "1")
    job = server.stub.SubmitJob(pb.SubmitJobRequest(spec=SPEC), timeout=60)
    _progress_until(server.stub, job.job_id, STEPS_PER_EPOCH // 2)
    killed_at_step = STEPS_PER_EPOCH // 2
    server.end(signal.SIGKILL)

    resumed = _resume_and_finish(tmp_path, mnist_path, job.job_id)
    done = resumed["job"]
    reasons = [t.reason for t in done.transitions if t.state == pb.JOB_STATE_QUEUED]
    assert "after a server restart" in reasons[-1] and "step" in reasons[-1], reasons
    resumed_from = resumed["resumed_from_step"]
    assert resumed_from > 0, "resumed from the start, not from the checkpoint"
    work_lost = killed_at_step - resumed_from  # steps trained twice

    straight = _uninterrupted_accuracy(mnist_path)
    accuracy = done.result.test_accuracy
    print(
        f"\nkill -9 at step ~{killed_at_step} of {STEPS_PER_EPOCH}: resumed at step "
        f"{resumed_from}, about {max(work_lost, 0)} steps trained again; "
        f"first progress {resumed['resume_seconds']:.1f} s after the restart; test accuracy "
        f"{accuracy:.4%} resumed vs {straight:.4%} uninterrupted "
        f"({'exactly equal' if accuracy == straight else 'not bitwise equal'})"
    )
    assert abs(accuracy - straight) <= 0.003


def test_sigterm_checkpoints_exits_and_the_restart_resumes(tmp_path, mnist_path):
    server = ServeProcess(tmp_path, mnist_path.parent, "--shutdown-grace", "60")
    job = server.stub.SubmitJob(pb.SubmitJobRequest(spec=SPEC), timeout=60)
    _progress_until(server.stub, job.job_id, STEPS_PER_EPOCH // 3)
    started = time.monotonic()
    assert server.end(signal.SIGTERM) == 0
    stop_seconds = time.monotonic() - started
    log = server.log_path.read_text()
    assert "shutting down" in log

    resumed = _resume_and_finish(tmp_path, mnist_path, job.job_id)
    reasons = [t.reason for t in resumed["job"].transitions if t.state == pb.JOB_STATE_QUEUED]
    assert reasons[-1].startswith("resumed from epoch 1, step"), reasons
    # The checkpoint was taken at the stop, so nothing before it is trained again.
    assert resumed["resumed_from_step"] >= STEPS_PER_EPOCH // 3
    print(
        f"\nSIGTERM at step ~{STEPS_PER_EPOCH // 3}: the server exited in {stop_seconds:.1f} s; "
        f"resumed at step {resumed['resumed_from_step']} with no work lost; first progress "
        f"{resumed['resume_seconds']:.1f} s after the restart"
    )


def test_a_second_server_on_the_same_state_directory_is_refused(tmp_path, mnist_path):
    first = ServeProcess(tmp_path, mnist_path.parent)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--port", "0", "--no-metrics",
             "--state-dir", str(tmp_path), "--no-warm-worker"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert "in use by another ntrain server" in lines[0]
        assert f"pid {first.process.pid}" in lines[0]
        # The first one is untouched and still answers.
        first.stub.ListJobs(pb.ListJobsRequest(), timeout=10)
    finally:
        assert first.end(signal.SIGTERM) == 0
