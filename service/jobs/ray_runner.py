"""Follows one multi_worker job on a Ray cluster: the Ray `Runner`.

Instead of a worker process it has a Ray job, submitted through Ray Jobs' REST API under
the ntrain job id (or found there again after a server restart). It polls the
job's status and its driver's log, turns the event lines of the log
(`service.protocol.event_line`) back into the typed events a local worker
sends, and stops the Ray job when the control loop stops the run.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from service.jobs.ray_jobs import RayJobNotFound, RayJobsClient, RayJobsError
from service.jobs.runner import OnEnd, OnEvent, RunEnd, RunnerThread, RunOutcome
from service.protocol import (
    EpochEnd,
    Failed,
    Progress,
    RayTrainTask,
    TrainingResult,
    parse_event_lines,
)

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # events reach the store within about this (the issue asks for 2 s)
# How long Ray Jobs may stay unreachable before the job is given up as FAILED.
UNREACHABLE_SECONDS = 120.0
# How long a stopped Ray job may take to report STOPPED before the runner reports anyway.
STOP_WAIT_SECONDS = 60.0
# The events the job manager stores: a restarted server counts those it holds.
STORED_EVENTS = (Progress, EpochEnd, TrainingResult)


class RayRunner(RunnerThread):
    """Runs `task` as a Ray job and follows it.

    Args:
        stored_events: how many `STORED_EVENTS` of this job the store holds
            already (a server restart reattaching): that many are skipped,
            with every event before the last of them.
        log_path: the job's train.log, where the driver's log is copied as it
            grows, so `ntrain logs` reads a Ray job as it reads a local one.

    `request_stop` (the server is shutting down) leaves the Ray job running and
    stops following it; the next server start finds it again by its submission id.
    """

    def __init__(
        self,
        task: RayTrainTask,
        *,
        client: RayJobsClient,
        on_event: OnEvent,
        on_end: OnEnd,
        stored_events: int = 0,
        log_path: Path | None = None,
        poll_seconds: float = POLL_SECONDS,
    ):
        super().__init__(task.job_id, on_event=on_event, on_end=on_end, kind="ray")
        self.task = task
        self._client = client
        self._to_skip = stored_events
        self._poll = poll_seconds
        self._wake = threading.Event()
        self._seen = 0  # the number of the last event line taken
        self._log_path = log_path
        # Ray Jobs gives the whole log each time; what the file holds already
        # (from before a server restart, too) is not written again.
        self._log_copied = log_path.stat().st_size if log_path and log_path.exists() else 0
        self._failed: Failed | None = None
        self._result = False

    def _end_now(self) -> None:
        self._wake.set()

    def _ask_to_stop(self) -> None:
        self._wake.set()

    def _follow(self) -> RunOutcome:
        if not self._attach():
            return RunOutcome(RunEnd.STOPPED, "the server stopped before the Ray job was submitted")
        last_contact = time.monotonic()
        stop_sent: float | None = None
        while True:
            if self.stop_requested:
                return RunOutcome(RunEnd.STOPPED, "the server stopped following the Ray job")
            stop = self.stopping
            try:
                if stop is not None and stop_sent is None:
                    self._client.stop(self.job_id)
                    stop_sent = time.monotonic()
                self._take_events(self._client.logs(self.job_id))
                status = self._client.status(self.job_id)
                if status.finished:  # its log is whole now: take its last lines
                    self._take_events(self._client.logs(self.job_id))
                    return self._outcome(status.status, status.message)
                last_contact = time.monotonic()
            except RayJobNotFound:
                if stop is not None:  # nothing left to stop: the stop stands as the outcome
                    return RunOutcome(stop.end, stop.reason)
                return RunOutcome(
                    RunEnd.FAILED, f"the Ray job {self.job_id} is gone from the cluster"
                )
            except RayJobsError as error:
                if time.monotonic() - last_contact > UNREACHABLE_SECONDS:
                    return RunOutcome(RunEnd.FAILED, f"lost the Ray job: {error}")
                log.warning("Ray job %s: %s; trying again", self.job_id, error)
            if stop_sent is not None and time.monotonic() - stop_sent > STOP_WAIT_SECONDS:
                return self._outcome("STOPPED", "Ray did not confirm the stop in time")
            self._wake.wait(self._poll)
            self._wake.clear()

    def _attach(self) -> bool:
        """Find the Ray job of this id, or submit it; False when the server stops first."""
        deadline = time.monotonic() + UNREACHABLE_SECONDS
        while True:
            try:
                try:
                    self._client.status(self.job_id)  # there already: a restarted server
                except RayJobNotFound:
                    self._client.submit(self.task)
                return True
            except RayJobsError as error:
                if time.monotonic() > deadline:
                    raise
                log.warning("Ray job %s: %s; trying again", self.job_id, error)
            if self.stop_requested or self.stopping is not None:
                return not self.stop_requested
            self._wake.wait(self._poll * 4)
            self._wake.clear()

    def _copy_log(self, logs: str) -> None:
        if self._log_path is None:
            return
        text = logs.encode()
        if len(text) > self._log_copied:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._log_path, "ab") as copy:
                copy.write(text[self._log_copied :])
            self._log_copied = len(text)

    def _take_events(self, logs: str) -> None:
        self._copy_log(logs)
        for sequence, event in parse_event_lines(logs):
            if sequence <= self._seen:
                continue
            self._seen = sequence
            if self._to_skip:  # the store has it from before a server restart
                if isinstance(event, STORED_EVENTS):
                    self._to_skip -= 1
                continue
            if isinstance(event, Failed):
                self._failed = event
                continue
            if isinstance(event, TrainingResult):
                self._result = True
            self._on_event(event)

    def _outcome(self, status: str, message: str) -> RunOutcome:
        """The run's end from Ray's status; a stop asked for is applied by `RunnerThread`."""
        if status == "SUCCEEDED" and self._result:
            return RunOutcome(RunEnd.SUCCEEDED)
        if self._failed is not None:
            return RunOutcome(RunEnd.FAILED, self._failed.reason)
        if status == "STOPPED":
            return RunOutcome(RunEnd.FAILED, "the Ray job was stopped outside ntrain")
        if status == "SUCCEEDED":
            return RunOutcome(RunEnd.FAILED, "the Ray job ended without a training result")
        return RunOutcome(RunEnd.FAILED, f"the Ray job failed: {_last_line(message)}")


def _last_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no reason given"
