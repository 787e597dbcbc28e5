"""Followers across a graceful restart: `ntrain logs -f` and a watch lose and repeat nothing.

A server stopped with SIGTERM ends the streams of jobs that have not ended
with UNAVAILABLE (never OK); the clients reconnect to the server that takes
its place on the same port and state directory, and go on where they were.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
from ntrain.v1 import training_pb2 as pb

from ntrain.client import Client
from service.cli.local_server import LocalServer

pytestmark = pytest.mark.slow

# Short calls and a few epochs: many log lines, and a job that outlives the restart.
SPEC = {
    "dataset": "synthetic",
    "layers": [{"units": 32, "activation": "relu"}, {"units": 10, "activation": "softmax"}],
    "batchSize": 64,
    "epochs": 6,
    "stepsPerExecution": 2,
    "strategy": {"name": "cpu"},
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_log_and_event_followers_survive_a_sigterm_restart(tmp_path):
    port = _free_port()
    state = tmp_path / "state"
    args = ["--port", str(port), "--no-metrics", "--no-warm-worker"]
    server = LocalServer(state, args)
    try:
        client = Client(server.address, timeout=30)
        job = client.submit(SPEC)
        events: list[int] = []
        watch = threading.Thread(
            target=lambda: events.extend(e.sequence for e in client.watch(job.job_id)),
            daemon=True,
        )
        watch.start()
        follower = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "logs", "-f", job.job_id,
             "--address", server.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while client.get(job.job_id).progress.step < 10:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.05)

        assert server.stop() == 0  # SIGTERM: the job checkpoints and waits for the next server
        assert follower.poll() is None, "the log follower took the shutdown for the job's end"
        server = LocalServer(state, args)

        out, err = follower.communicate(timeout=600)
        watch.join(600)
        done = client.get(job.job_id)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.failure_reason
        assert follower.returncode == 0, err
        assert "connection lost; reconnecting at byte" in err
        log = (state / "jobs" / job.job_id / "train.log").read_text().splitlines()
        assert out.splitlines() == log  # every line once, in order, across the restart
        # Every event once, in order: the whole history as a fresh watch replays it.
        assert events == [event.sequence for event in client.watch(job.job_id)]
        assert events == list(range(1, len(events) + 1))
        print(
            f"\nacross a SIGTERM restart: {len(log)} log lines followed, {len(events)} events "
            "watched, none missed or repeated"
        )
    finally:
        server.stop()
