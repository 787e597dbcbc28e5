"""kill -9 of a real server running an experiment, at three points, then a restart.

Each test starts `ntrain serve` (LocalServer), submits a 3-trial search on the
synthetic data set, kills the server with SIGKILL at one point and starts it
again on the same state directory, and checks that the experiment ends with
the 3 trials an uninterrupted run has: numbers 0, 1, 2 once each, one job per
trial (no trial submitted twice), none lost. Two points are reached with the
test hook `NTRAIN_TEST_EXPERIMENT_PAUSE` (service/jobs/experiments.py): the
server stops there and writes `experiment-paused`; the third is mid-trial,
after trial 1's first epoch was stored.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest
from ntrain.v1 import training_pb2 as pb

from ntrain.client import Client
from service.cli.local_server import LocalServer
from service.jobs.experiments import PAUSE_ENV, PAUSED_FILE

pytestmark = pytest.mark.slow

TRIALS = 3
SPEC = pb.ExperimentSpec(
    base=pb.JobSpec(dataset="synthetic", epochs=20, strategy=pb.StrategySpec(name="cpu")),
    parameters=[
        pb.SearchParameter(
            name="learning_rate", float_range=pb.FloatRange(low=1e-4, high=1e-2, log=True)
        ),
        pb.SearchParameter(
            name="optimizer", categorical=pb.CategoricalValues(values=["adam", "sgd"])
        ),
    ],
    searcher="tpe",
    max_trials=TRIALS,
    max_concurrent_trials=1,
    seed=5,
)
WAIT_SECONDS = 600.0


def start(state_dir: Path, pause: str = "") -> LocalServer:
    env = {key: value for key, value in os.environ.items() if key != PAUSE_ENV}
    if pause:
        env[PAUSE_ENV] = pause
    return LocalServer(state_dir, ["--no-metrics"], env=env)


def kill(server: LocalServer) -> None:
    """SIGKILL this test's own server, then wait for its orphaned workers to end.

    They hold the state directory's lock until they see their parent gone
    (service/jobs/lock.py); one importing TensorFlow on a loaded machine may
    take longer than a new server waits for them.
    """
    server.process.kill()
    server.process.wait(60)
    fd = os.open(server.state_dir / "server.lock", os.O_RDWR)
    try:
        wait_for(lambda: _lock_free(fd), "the killed server's workers to end")
    finally:
        os.close(fd)


def _lock_free(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT_SECONDS:.0f} s for {what}"
        time.sleep(0.1)


def finish_after_restart(state_dir: Path, experiment_id: str) -> pb.Experiment:
    """Start the server again, let the experiment end, and check its trials and jobs."""
    server = start(state_dir)
    try:
        with Client(server.address, timeout=60) as client:
            done = client.wait_experiment(experiment_id)
            jobs = client.list(labels={"experiment": experiment_id}, limit=100)
    finally:
        server.stop()
    assert done.state == pb.EXPERIMENT_STATE_SUCCEEDED, done.reason
    assert [trial.number for trial in done.trials] == list(range(TRIALS))
    assert all(trial.state == pb.TRIAL_STATE_SUCCEEDED for trial in done.trials), done.trials
    # One job per trial: none submitted twice, none lost.
    assert sorted(job.request_id for job in jobs) == sorted(
        f"{experiment_id}-trial-{n}" for n in range(TRIALS)
    )
    assert sorted(trial.job_id for trial in done.trials) == sorted(job.job_id for job in jobs)
    print(
        f"\n{experiment_id}: {len(done.trials)} trials, {len(jobs)} jobs after the restart "
        f"(uninterrupted: {TRIALS})"
    )
    return done


def submit(server: LocalServer) -> str:
    with Client(server.address, timeout=120) as client:
        return client.submit_experiment(SPEC).experiment_id


def test_killed_after_a_trial_was_asked_before_its_job_was_submitted(tmp_path):
    server = start(tmp_path, pause="asked:1")
    try:
        experiment_id = submit(server)
        wait_for((tmp_path / PAUSED_FILE).exists, "the pause after trial 1 was asked")
        with Client(server.address) as client:  # trial 1 has no job yet
            jobs = client.list(labels={"experiment": experiment_id})
            assert [job.spec.labels["trial"] for job in jobs] == ["0"]
    finally:
        kill(server)
    finish_after_restart(tmp_path, experiment_id)


def test_killed_mid_trial(tmp_path):
    server = start(tmp_path)
    try:
        experiment_id = submit(server)
        with Client(server.address, timeout=60) as client:

            def trial_1_trained_an_epoch() -> bool:
                trials = client.get_experiment(experiment_id).trials
                return len(trials) > 1 and trials[1].epochs >= 1

            wait_for(trial_1_trained_an_epoch, "trial 1's first epoch")
            running = client.get_experiment(experiment_id).trials[1]
            assert running.state == pb.TRIAL_STATE_RUNNING
    finally:
        kill(server)
    done = finish_after_restart(tmp_path, experiment_id)
    assert done.trials[1].epochs == 20


def test_killed_between_a_trials_end_and_the_next_ask(tmp_path):
    server = start(tmp_path, pause="told:0")
    try:
        experiment_id = submit(server)
        wait_for((tmp_path / PAUSED_FILE).exists, "the pause after trial 0 was told")
    finally:
        kill(server)
    finish_after_restart(tmp_path, experiment_id)
