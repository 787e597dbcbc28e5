"""Multi_worker jobs through `ntrain serve` on a real Ray cluster, run inside its namespace.

Usage (by tests/test_ray_cluster.py): ip netns exec NS python ray_scenario_main.py
    RAY_ADDRESS WORK_DIR OUT.json

Starts its own `ntrain serve --ray-address RAY_ADDRESS`, then: a reference
job end to end (progress on WatchJob, both workers' weights, a checkpoint,
Evaluate), a job that streams its data, a cancel, and a job one of whose Ray
workers is killed with SIGKILL after its first checkpoint. Writes what it saw to OUT.json: the test
asserts on it. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

from ntrain.v1 import training_pb2 as pb

from benchmarks.ray_cluster import follow, ray_logs, ray_server, spec
from ntrain.client import Client

JOB_SECONDS = 420.0


def ray_status(ray_address: str, job_id: str) -> str:
    with urllib.request.urlopen(f"{ray_address}/api/jobs/{job_id}", timeout=10) as answer:
        return json.loads(answer.read())["status"]


def digests(logs: str) -> dict[str, str]:
    return dict(re.findall(r"ntrain: worker (\d+) weights sha256 ([0-9a-f]+)", logs))


def train_workers() -> list[int]:
    """Pids of Ray Train's worker processes (their titles name the actor)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith("ray::RayTrainWorker"):
            found.append(int(entry.name))
    return sorted(found)


def main() -> None:
    ray_address, work, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    server = ray_server(work, ray_address)
    report: dict = {}
    try:
        client = Client(server.address, timeout=30)
        report["info_strategies"] = list(client.info().strategies)
        report["reference"] = reference_job(client, ray_address, work)
        out.write_text(json.dumps(report, indent=1))  # what came so far, should a later part hang
        report["streamed"] = streamed_job(client, ray_address)
        out.write_text(json.dumps(report, indent=1))
        report["cancel"] = cancel_job(client, ray_address)
        out.write_text(json.dumps(report, indent=1))
        report["kill"] = killed_job(client, ray_address, work)
    finally:
        out.write_text(json.dumps(report, indent=1))
        server.stop()


def followed_to_end(
    client: Client, ray_address: str, job_id: str, submitted: float, on_event=None
) -> tuple[dict, pb.Job, str]:
    """Follow a job to its end: what was seen, its state and weights; the job; its driver log."""
    seen = follow(client, job_id, submitted, on_event)
    job = client.get(job_id)
    logs = ray_logs(ray_address, job_id)
    ended = {
        **seen,
        "job_id": job_id,
        "state": pb.JobState.Name(job.state),
        "failure_reason": job.failure_reason,
        "digests": digests(logs),
    }
    return ended, job, logs


def reference_job(client: Client, ray_address: str, work: Path) -> dict:
    submitted = time.monotonic()
    job = client.submit(spec(epochs=3))
    ended, job, logs = followed_to_end(client, ray_address, job.job_id, submitted)
    job_dir = work / "state" / "jobs" / job.job_id
    evaluation = client.evaluate(job.job_id)
    from_checkpoint = client.evaluate(job.job_id, checkpoint=True)
    return {
        **ended,
        "strategy": job.strategy,
        "test_accuracy": job.result.test_accuracy,
        "driver_log": logs.splitlines()[-80:],
        "ray_checkpoints": sorted(p.name for p in (job_dir / "ray" / job.job_id).glob("check*")),
        "has_checkpoint": (job_dir / "checkpoints" / "checkpoint").is_file(),
        "evaluate_accuracy": evaluation.accuracy,
        "evaluate_checkpoint_accuracy": from_checkpoint.accuracy,
        "evaluate_checkpoint_source": from_checkpoint.source,
    }


def streamed_job(client: Client, ray_address: str) -> dict:
    """A job that asks to stream: every host reads its share of each window as it trains."""
    submitted = time.monotonic()
    job = client.submit({**spec(epochs=2), "dataMode": "stream"})
    ended, job, logs = followed_to_end(client, ray_address, job.job_id, submitted)
    return {
        **ended,
        "reasons": [t.reason for t in job.transitions],
        "test_accuracy": job.result.test_accuracy,
        "data_lines": [line for line in logs.splitlines() if ": training data " in line],
    }


def cancel_job(client: Client, ray_address: str) -> dict:
    submitted = time.monotonic()
    job = client.submit(spec(epochs=50))
    for event in client.watch(job.job_id):
        if isinstance(event.payload, pb.Progress):
            break
        assert time.monotonic() - submitted < JOB_SECONDS, "no progress"
    workers_before = train_workers()
    asked = time.monotonic()
    job = client.cancel(job.job_id)
    canceled_s = time.monotonic() - asked
    while train_workers() and time.monotonic() - asked < 30:
        time.sleep(0.1)
    return {
        "job_id": job.job_id,
        "state": pb.JobState.Name(client.get(job.job_id).state),
        "canceled_s": canceled_s,
        "workers_before": len(workers_before),
        "workers_gone_s": time.monotonic() - asked,
        "workers_left": len(train_workers()),
        "ray_status": ray_status(ray_address, job.job_id),
    }


def killed_job(client: Client, ray_address: str, work: Path) -> dict:
    submitted = time.monotonic()
    job = client.submit(spec(epochs=3))
    killed: dict = {}

    def on_event(payload) -> None:
        # The first epoch's checkpoint is reported right after its summary.
        if isinstance(payload, pb.EpochSummary) and payload.epoch == 1 and not killed:
            reported = work / "state" / "jobs" / job.job_id / "ray" / job.job_id
            deadline = time.monotonic() + 60
            # Ray has the epoch's checkpoint once its snapshot names one.
            snapshot = reported / "checkpoint_manager_snapshot.json"
            while time.monotonic() < deadline and "checkpoint_20" not in (
                snapshot.read_text() if snapshot.exists() else ""
            ):
                time.sleep(0.05)
            workers = train_workers()
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed["pid"] = workers[-1]
                killed["after_s"] = time.monotonic() - submitted

    ended, job, logs = followed_to_end(client, ray_address, job.job_id, submitted, on_event)
    return {
        **ended,
        "killed": killed,
        "resumed_lines": [line for line in logs.splitlines() if '"type": "Resumed"' in line],
        "driver_log": logs.splitlines()[-80:],
        # The nodes share this machine's /tmp: the killed worker's scratch must be gone too.
        "scratch_left": [p.name for p in Path("/tmp").glob(f"ntrain-{job.job_id}-*")],
    }


if __name__ == "__main__":
    main()
