"""Multi_worker jobs through `ntrain serve` on a real two-node Ray cluster.

One scenario (tests/ray_scenario_main.py) runs inside the cluster's network
namespace with its own server, and reports what it saw; the tests below read
its report. Needs root (`ip netns`), as CI has; Ray comes with the `ray` extra.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import IN_CI, require_tool

from benchmarks.ray_cluster import run_inside, write_blobs

# The cluster's start (about 30 s), three jobs and the teardown: some 5 minutes
# on a quiet 2-core machine, more on a busy one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

SCENARIO = Path(__file__).with_name("ray_scenario_main.py")
SCENARIO_SECONDS = 1200


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    require_tool("ip")
    if importlib.util.find_spec("ray") is None:
        message = "ray is not installed (the ray extra: make installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    work = tmp_path_factory.mktemp("ray")
    write_blobs(work)
    out = work / "report.json"
    command = [sys.executable, str(SCENARIO)]
    done, all_ended = run_inside(work, command, out, timeout=SCENARIO_SECONDS)
    assert all_ended
    print(out.read_text() if out.exists() else "no report")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:] + _tail(work / "server.log")
    return json.loads(out.read_text())


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def test_a_job_trains_on_two_hosts_end_to_end(report):
    job = report["reference"]
    assert "multi_worker" in report["info_strategies"]
    assert job["state"] == "JOB_STATE_SUCCEEDED", job["failure_reason"]
    assert job["strategy"] == "multi_worker"
    assert job["states"][:3] == ["JOB_STATE_QUEUED", "JOB_STATE_STARTING", "JOB_STATE_RUNNING"]
    assert job["epochs"] == [1, 2, 3]
    # The history keeps a progress report per --progress-interval and each epoch's
    # last: 128 steps an epoch (8,192 examples, batch 64).
    steps = job["progress_steps"]
    assert steps == sorted(set(steps)) and {128, 256, 384} <= set(steps)
    # Both workers, in lock step, ended with the very same weights.
    assert len(job["digests"]) == 2 and len(set(job["digests"].values())) == 1
    assert job["ray_checkpoints"] and job["has_checkpoint"]
    assert job["test_accuracy"] > 0.5
    assert job["evaluate_accuracy"] == pytest.approx(job["test_accuracy"], abs=1e-6)
    assert job["evaluate_checkpoint_accuracy"] == pytest.approx(job["test_accuracy"], abs=1e-6)


def test_a_job_that_asks_to_stream_streams_on_every_host(report):
    job = report["streamed"]
    assert job["state"] == "JOB_STATE_SUCCEEDED", job["failure_reason"]
    assert job["epochs"] == [1, 2]
    # 128 batches an epoch in windows of 64, said in the RUNNING transition and by each host.
    running = [reason for reason in job["reasons"] if "replica(s)" in reason]
    assert running and "streamed in windows of 64 batches" in running[0], job["reasons"]
    # Every line a host printed (a restarted group prints again), from both ranks.
    lines = job["data_lines"]
    assert {re.search(r"rank (\d+): training data", line)[1] for line in lines} == {"0", "1"}, lines
    assert all("streamed in windows of 64 batches" in line for line in lines), lines
    # Each host reads only its half of every window: its replica's slices of the batches.
    for line in lines:
        rank = re.search(r"rank (\d+): training data", line)[1]
        assert f"host {rank} of 2 reads and holds 2048 of each window's 4096 rows" in line, line
    assert len(job["digests"]) == 2 and len(set(job["digests"].values())) == 1
    assert job["test_accuracy"] > 0.5


def test_cancel_stops_the_ray_job_and_its_workers(report):
    job = report["cancel"]
    assert job["state"] == "JOB_STATE_CANCELED"
    assert job["ray_status"] == "STOPPED"
    assert job["workers_before"] == 2 and job["workers_left"] == 0
    assert job["workers_gone_s"] < 10


def test_a_killed_worker_resumes_from_its_checkpoint_and_ends_as_if_never_killed(report):
    job = report["kill"]
    assert job["killed"], "no Ray worker was found to kill"
    assert job["state"] == "JOB_STATE_SUCCEEDED", job["failure_reason"]
    assert job["resumed_lines"], "the restarted workers did not resume from a checkpoint"
    assert job["scratch_left"] == []
    assert len(set(job["digests"].values())) == 1
    # Bitwise the weights of the uninterrupted reference job (same spec, same seed).
    assert set(job["digests"].values()) == set(report["reference"]["digests"].values())
