"""A real server killed with kill -9, its store then damaged: the restart loses no job.

The four damages of the hostile probe (issue 19): the `ntrain.db-wal` that
holds the history after a kill -9 deleted, cut in half, or its tail
overwritten, and a 0-byte `ntrain.db`. Each time `ntrain store check` names
what disagrees, and the next server rebuilds the records from the job
folders' journals: every job is there, and a SUCCEEDED job does not run again.
The only process killed is the server this test started, by its pid.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc

from service.cli.local_server import LocalServer
from service.cli.specs import book_job_spec
from service.jobs.lock import StateDirLock
from service.jobs.store import Store

pytestmark = pytest.mark.slow

SHORT = book_job_spec(
    pb.JobSpec(
        epochs=1,
        dataset="synthetic",
        strategy=pb.StrategySpec(name="cpu"),
        layers=[
            pb.LayerSpec(units=16, activation="relu"),
            pb.LayerSpec(units=10, activation="softmax"),
        ],
    )
)
LONG = book_job_spec(
    pb.JobSpec(epochs=5000, dataset="synthetic", strategy=pb.StrategySpec(name="cpu"))
)


def _wal_deleted(state: Path) -> None:
    (state / "ntrain.db-wal").unlink()
    (state / "ntrain.db-shm").unlink(missing_ok=True)


def _wal_halved(state: Path) -> None:
    wal = state / "ntrain.db-wal"
    wal.write_bytes(wal.read_bytes()[: wal.stat().st_size // 2])


def _wal_tail_damaged(state: Path) -> None:
    wal = state / "ntrain.db-wal"
    data = bytearray(wal.read_bytes())
    data[-8192:] = bytes(range(256)) * 32  # the last two pages' frames, garbled
    wal.write_bytes(bytes(data))


def _db_emptied(state: Path) -> None:
    (state / "ntrain.db").write_bytes(b"")


DAMAGES = {
    "deleted -wal": _wal_deleted,
    "half -wal": _wal_halved,
    "damaged -wal tail": _wal_tail_damaged,
    "0-byte ntrain.db": _db_emptied,
}


def _ntrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=120
    )


def _wait(stub, job_id: str, until) -> pb.Job:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30)
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not get there: {job}")


@pytest.fixture(scope="module")
def killed_state(tmp_path_factory) -> tuple[Path, dict[str, pb.Job]]:
    """A state directory whose server was killed with 3 jobs SUCCEEDED, 1 RUNNING, 1 QUEUED."""
    state = tmp_path_factory.mktemp("killed")
    server = LocalServer(state, ["--no-metrics", "--no-warm-worker", "--max-cpu-jobs", "1"])
    channel = grpc.insecure_channel(server.address)
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    try:
        done = [stub.SubmitJob(pb.SubmitJobRequest(spec=SHORT), timeout=60) for _ in range(3)]
        for job in done:
            _wait(stub, job.job_id, lambda job: job.state == pb.JOB_STATE_SUCCEEDED)
        running = stub.SubmitJob(pb.SubmitJobRequest(spec=LONG), timeout=60)
        _wait(stub, running.job_id, lambda job: job.progress.step > 0)
        queued = stub.SubmitJob(pb.SubmitJobRequest(spec=SHORT), timeout=60)
        jobs = {
            job.job_id: stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=30)
            for job in (*done, running, queued)
        }
        # While the server runs and its job writes progress: the online backup.
        backup = state.parent / "backup.db"
        made = _ntrain("store", "backup", "--state-dir", str(state), "--to", str(backup))
        assert made.returncode == 0, made.stderr
        print(f"\n$ ntrain store backup  # under the running server\n{made.stdout}", end="")
    finally:
        channel.close()
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(60)
    # Its orphaned worker ends when it sees the server gone, and lets go of the lock.
    lock = StateDirLock(state)
    lock.acquire()
    lock.release()
    assert (state / "ntrain.db-wal").stat().st_size > 0
    return state, jobs


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_after_kill_9_and_a_damaged_store_the_restart_rebuilds_every_job(
    damage, killed_state, tmp_path
):
    source, before = killed_state
    state = tmp_path / "state"
    shutil.copytree(source, state)
    DAMAGES[damage](state)

    checked = _ntrain("store", "check", "--state-dir", str(state))
    print(f"\n$ ntrain store check  # after kill -9, {damage} (exit {checked.returncode})")
    print(checked.stdout + checked.stderr, end="")
    assert checked.returncode == 1
    assert "disagreements" in checked.stdout.splitlines()[-1]

    server = LocalServer(state, ["--no-metrics", "--no-warm-worker", "--max-cpu-jobs", "1"])
    channel = grpc.insecure_channel(server.address)
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    try:
        listed = stub.ListJobs(pb.ListJobsRequest(page_size=100), timeout=30).jobs
        after = {job.job_id: job for job in listed}
        rebuilt = [line for line in server.log_text().splitlines() if "rebuilt its record" in line]
        print(f"server: {len(rebuilt)} 'rebuilt' lines, e.g. {rebuilt[0] if rebuilt else None}")
        assert set(after) == set(before)
        for job_id, job in before.items():
            if job.state == pb.JOB_STATE_SUCCEEDED:
                assert after[job_id].state == pb.JOB_STATE_SUCCEEDED
                events = list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=30))
                assert [event.sequence for event in events] == list(range(1, len(events) + 1))
                states = [e.state_change.state for e in events if e.HasField("state_change")]
                assert states.count(pb.JOB_STATE_STARTING) == 1  # never ran again
        assert rebuilt  # one line per job rebuilt
    finally:
        channel.close()
        server.stop()
    final = _ntrain("store", "check", "--state-dir", str(state))
    assert final.returncode == 0, final.stdout


def test_a_backup_taken_under_the_running_server_opens_and_lists_every_job(killed_state, tmp_path):
    source, before = killed_state
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(source.parent / "backup.db", restored / "ntrain.db")
    store = Store(restored)
    try:
        assert {record.job_id for record in store.list_jobs(limit=100)[0]} == set(before)
        for job_id, job in before.items():
            if job.state == pb.JOB_STATE_SUCCEEDED:
                assert store.get_job(job_id).state.name == "SUCCEEDED"
    finally:
        store.close()
