"""The life of a running job inside the job manager: start, restart, finish, recover.

`JobLifecycle` holds the job manager's methods that place queued jobs on
devices, start a `JobRunner` for each, turn its worker's events into stored
events and metrics, and record how it ended: SUCCEEDED, FAILED, CANCELED, or
queued again (a restart after its worker died, a resume after a server
restart). `JobManager` (service/jobs/manager.py), which answers the requests,
is built on it; these methods run under the manager's lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from service.devices import DeviceInventory
from service.jobs.feed import JobFeed
from service.jobs.model_tasks import ModelTasks
from service.jobs.ray_jobs import RayJobsClient, RayJobsError
from service.jobs.ray_runner import STORED_EVENTS, RayRunner
from service.jobs.reporting import JobMetrics, report_metrics
from service.jobs.runner import JobRunner, RunOutcome
from service.jobs.scheduler import Assignment, Demand, Scheduler
from service.jobs.store import Event, JobRecord, Store
from service.processes.warm_pool import WorkerPool
from service.protocol import (
    CheckpointSaved,
    EpochEnd,
    JobEventPayload,
    JobSpec,
    Progress,
    RayTrainTask,
    Running,
    TrainingResult,
    TrainTask,
    WorkerEvent,
)

log = logging.getLogger(__name__)

_OUTCOMES = {"SUCCEEDED": "succeeded", "FAILED": "failed", "CANCELED": "canceled"}


class JobLifecycle:
    # Set by JobManager.__init__.
    store: Store
    inventory: DeviceInventory
    metrics: JobMetrics
    data_dir: Path | None
    checkpoint_seconds: float | None
    pool: WorkerPool
    models: ModelTasks
    scheduler: Scheduler
    feed: JobFeed
    ray: RayJobsClient | None
    _lock: threading.RLock
    _runners: dict[str, JobRunner | RayRunner]
    _closed: bool
    _clock: Callable[[], float]
    _wakeup: threading.Timer | None

    # Defined by JobManager.
    def get(self, job_id: str) -> JobRecord:
        raise NotImplementedError

    def append(self, job_id: str, payload: JobEventPayload) -> Event:
        raise NotImplementedError

    def _transition(
        self,
        job_id: str,
        state: str,
        reason: str = "",
        *,
        strategy: str | None = None,
        devices: tuple[str, ...] | None = None,
    ) -> Event:
        raise NotImplementedError

    def _report_counts(self) -> None:
        raise NotImplementedError

    def _demand(self, spec: JobSpec) -> Demand:
        raise NotImplementedError

    def _recover(self, record: JobRecord) -> None:
        if record.state == "CANCELLING":
            if record.spec.strategy == "multi_worker" and self.ray is not None:
                try:  # the server may have stopped before it asked Ray
                    self.ray.stop(record.job_id)
                except RayJobsError as error:
                    log.warning("could not stop the Ray job %s: %s", record.job_id, error)
            self._transition(record.job_id, "CANCELED", "the server stopped while cancelling")
        elif record.state == "QUEUED":
            self._enqueue(record)
        elif record.spec.strategy == "multi_worker":
            # Its Ray job ran on without the server: follow it again by its submission id.
            self._enqueue(record)
        else:  # STARTING or RUNNING when the server ended (SIGTERM, kill -9, power loss)
            where = _resume_point(record)
            self._requeue(record, f"resumed {where} after a server restart")

    def _requeue(self, record: JobRecord, reason: str) -> None:
        """Queue a job again; its worker resumes from its newest checkpoint."""
        self._transition(record.job_id, "QUEUED", reason)
        self._enqueue(record)

    def _enqueue(self, record: JobRecord) -> None:
        try:
            self.scheduler.enqueue(record.job_id, self._demand(record.spec))
        except Exception as error:  # the host changed under a queued job
            self._transition(record.job_id, "FAILED", f"cannot run on this host: {error}")

    def _dispatch(self) -> None:
        """Start every queued job the scheduler can place now."""
        if self._closed:
            return
        for assignment in self.scheduler.next_runnable():
            record = self.get(assignment.job_id)
            if assignment.strategy == "multi_worker":
                if record.state == "QUEUED":  # else reattaching after a server restart
                    self._transition(
                        assignment.job_id,
                        "STARTING",
                        f"on Ray at {self.ray.address if self.ray else '?'}, "
                        f"{record.spec.hosts} host(s), "
                        f"{record.spec.gpus_per_host} GPU(s) each",
                        strategy=assignment.strategy,
                        devices=(),
                    )
                runner: JobRunner | RayRunner = self._ray_runner(record)
                self._runners[assignment.job_id] = runner
                runner.start()
                continue
            devices = self.inventory.device_names(assignment.gpus)
            shared = ""
            if assignment.memory_limit_bytes:
                shared = f" (shared, {assignment.memory_limit_bytes / 1024**3:.1f} GiB limit)"
            self._transition(
                assignment.job_id,
                "STARTING",
                f"on {', '.join(devices)}{shared}",
                strategy=assignment.strategy,
                devices=devices,
            )
            runner = self._runner(self.get(assignment.job_id), assignment)
            self._runners[assignment.job_id] = runner
            runner.start()
        self._wake_up_later()
        self._refill_when_idle()

    def _wake_up_later(self) -> None:
        """Dispatch again when waiting alone next lets a job start (an auto job's GPU wait)."""
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        wakeup = self.scheduler.next_wakeup()
        if wakeup is None or self._closed:
            return
        self._wakeup = threading.Timer(max(0.0, wakeup - time.monotonic()), self._woken)
        self._wakeup.daemon = True
        self._wakeup.start()

    def _woken(self) -> None:
        with self._lock:
            self._dispatch()
            self._report_counts()

    def _runner(self, record: JobRecord, assignment: Assignment) -> JobRunner:
        job_id = record.job_id
        task = TrainTask(
            job_id=job_id,
            job_dir=self.store.job_dir(job_id),
            spec=record.spec,
            strategy=assignment.strategy,
            replicas=assignment.replicas,
            cuda_visible_devices=self.inventory.cuda_visible_devices(assignment.gpus),
            gpu_names=self.inventory.device_names(assignment.gpus) if assignment.gpus else (),
            data_dir=self.data_dir,
            checkpoint_seconds=self.checkpoint_seconds,
            gpu_memory_limit_mb=assignment.memory_limit_bytes // 1024**2,
        )

        def on_finish(outcome: RunOutcome) -> None:
            self._finish(runner, outcome)

        runner = JobRunner(
            task,
            take_worker=self.pool.take,
            on_event=self._event_handler(record, assignment.strategy),
            on_finish=on_finish,
            max_runtime_seconds=record.spec.max_runtime_seconds,
        )
        return runner

    def _ray_runner(self, record: JobRecord) -> RayRunner:
        """A runner that submits the job to Ray, or follows its Ray job again."""
        assert self.ray is not None  # validation refuses multi_worker jobs without Ray
        job_dir = self.store.job_dir(record.job_id).resolve()
        task = RayTrainTask(
            job_id=record.job_id,
            job_dir=job_dir,
            spec=record.spec,
            hosts=record.spec.hosts,
            gpus_per_host=record.spec.gpus_per_host,
            data_dir=None if self.data_dir is None else self.data_dir.resolve(),
            storage_path=job_dir / "ray",
        )

        def on_finish(outcome: RunOutcome) -> None:
            self._finish(runner, outcome)

        runner = RayRunner(
            task,
            client=self.ray,
            on_event=self._event_handler(record, "multi_worker"),
            on_finish=on_finish,
            max_runtime_seconds=record.spec.max_runtime_seconds,
            stored_events=self._stored_events(record.job_id),
            log_path=self.store.job_files(record.job_id).train_log,
        )
        return runner

    def _stored_events(self, job_id: str) -> int:
        """How many of the job's events a runner forwarded into the store so far."""
        count, last = 0, 0
        while events := self.store.events_after(job_id, last):
            count += sum(1 for event in events if isinstance(event.payload, STORED_EVENTS))
            last = events[-1].sequence
        return count

    def _event_handler(self, record: JobRecord, strategy: str) -> Callable[[WorkerEvent], None]:
        """What becomes of each event of the job's worker (or Ray driver): store, metrics."""
        job_id = record.job_id
        first_progress = threading.Event()

        def on_event(event: WorkerEvent) -> None:
            if isinstance(event, Running):
                self._mark_running(job_id, event.replicas)
            elif isinstance(event, Progress) and not first_progress.is_set():
                first_progress.set()
                self.metrics.job_first_step(job_id, self._clock() - record.create_time)
            if isinstance(event, Progress | EpochEnd | TrainingResult):
                self.append(job_id, event)
            elif isinstance(event, CheckpointSaved):
                self.store.record_checkpoint(job_id, event)
                self.feed.changed(job_id)
            report_metrics(self.metrics, job_id, strategy, event)

        return on_event

    def _refill_when_idle(self) -> None:
        with self._lock:
            idle = not self._runners and not self.scheduler.queue_length and not self._closed
        if idle:
            self.pool.refill()
            if self.pool.warm_enabled:  # the inference worker, too, imports ahead when idle
                self.models.warm_up()
        self.metrics.set_warm_workers(self.pool.warm_ready)

    def _mark_running(self, job_id: str, replicas: int) -> None:
        with self._lock:
            if self.get(job_id).state == "STARTING":  # not when a cancel came first
                self._transition(job_id, "RUNNING", f"{replicas} replica(s)")
                self._report_counts()

    def _finish(self, runner: JobRunner | RayRunner, outcome: RunOutcome) -> None:
        """A runner's worker is gone: release devices, then record the end or restart."""
        job_id = runner.job_id
        with self._lock:
            self._runners.pop(job_id, None)
            self.scheduler.release(job_id)
            record = self.get(job_id)
            if outcome.state != "SUCCEEDED" and self._closed and not record.finished:
                # Stopped for the shutdown (on request, or killed after the
                # grace): the job stays RUNNING and resumes on the next start.
                return
            if outcome.worker_died and record.restarts < record.spec.max_restarts:
                restarts = self.store.count_restart(job_id)
                self.feed.changed(job_id)
                self._requeue(
                    record,
                    f"{outcome.reason}; restart {restarts} of {record.spec.max_restarts}, "
                    f"{_resume_point(record)}",
                )
            else:
                reason = outcome.reason
                if outcome.state == "FAILED" and record.restarts:
                    earlier = [
                        t.reason for t in record.transitions if t.state == "QUEUED" and t.reason
                    ][-record.restarts :]
                    reason = f"{reason} (after {record.restarts} restarts: {' | '.join(earlier)})"
                self._transition(job_id, outcome.state, reason)
                self.metrics.job_finished(job_id, _OUTCOMES[outcome.state], runner.run_seconds)
            self._dispatch()
            self._report_counts()


def _resume_point(record: JobRecord) -> str:
    """Where the job's newest checkpoint lets it go on from, in words."""
    checkpoint = record.checkpoint
    if checkpoint is None:
        return "from the start (no checkpoint yet)"
    if checkpoint.step_in_epoch:
        return f"from epoch {checkpoint.epoch + 1}, step {checkpoint.step_in_epoch} of it"
    return f"from epoch {checkpoint.epoch}"
