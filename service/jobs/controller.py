"""The control loop: the one owner of job state.

Every decision about a job is made here, one message at a time: admit a
submission, dispatch what the scheduler can place, recover what an earlier
server left unfinished, retry after a worker died, cancel, end a run past its
time limit, and leave running jobs to resume when the server shuts down. RPC
handlers and runners post messages (`post`; `call` waits for the answer) and
read immutable snapshots: job records through `JobFeed`, the loop's own view
(`LoopSnapshot`) through `snapshot`. Nothing else writes a job's record, and
no lock of this module is taken by another (Kubernetes controllers and
Kueue's scheduler work this way: one queue of events, one reconcile loop).

Runners report on their own threads by posting `WorkerReported` and, last,
`RunEnded`; a runner's events are handled in the order it sent them. What
callers ask (submit, cancel, shutdown, `InLoop`) is handled before runners'
reports already waiting: a job that floods the loop with events (thousands
of tiny epochs on a loaded machine) cannot hold a cancel back behind them. The
loop wakes by itself when time alone changes an answer: an `auto` job's wait
for a GPU ends, or a run reaches its max_runtime_seconds.

Tests drive the loop by hand, without its thread: `call` handles the inbox
at once when the loop does not run, `process_pending` handles what runners
posted, and `FakeClock` moves time (tests/test_controller.py).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

from naive_model.config import shown
from naive_model.leftovers import remove_leftovers
from service.jobs.errors import (
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    reason_line,
)
from service.jobs.feed import JobFeed
from service.jobs.reporting import JobMetrics, report_metrics
from service.jobs.runner import CANCEL, OnEnd, OnEvent, RunEnd, Runner, RunOutcome, Stop
from service.jobs.scheduler import Assignment, Candidate, Demand, Scheduler
from service.jobs.store import Event, JobRecord, Store
from service.protocol import (
    CheckpointSaved,
    EpochEnd,
    JobEventPayload,
    JobSpec,
    JobState,
    Progress,
    Resumed,
    Running,
    StateChange,
    TrainingResult,
    WorkerEvent,
)

log = logging.getLogger(__name__)

# A run stopped for the shutdown (killed after the grace): the job resumes on the next start.
SHUTDOWN = Stop(RunEnd.STOPPED, "the server shut down")
# How long runners stopped at shutdown get to report, past the grace.
STOPPED_RUNNER_SECONDS = 15.0
# How long a preempted run may take to checkpoint at its next compiled-call boundary.
PREEMPTION_GRACE_SECONDS = 60.0
# A job resumed after a preemption runs at least this long before another.
MIN_RUN_SECONDS = 120.0
# How often the end of a job that could not be recorded is tried again.
SETTLE_RETRY_SECONDS = 5.0
# A local worker that sends nothing this long (its heartbeat included) is taken for hung.
# Its heartbeat comes from a thread of its own every few seconds, whatever its compiled
# calls do; this is room for a process starved of CPU or of the GIL, not for a long call.
HANG_SECONDS = 120.0
# How long a run may take to send its first word before it is taken for hung.
STARTUP_SECONDS = 600.0
# A job's history keeps at most one Progress per this many seconds. A job of one
# step per compiled call reports hundreds a second: each stored is a SQLite
# write, a journal line and a message to every watcher (20 watchers of such a
# job took the server from 0.3 to 0.9 of a core, and the job from 270 to 130
# steps/s). A Progress that comes sooner is held; a newer one replaces it, and
# it is stored when its time comes or before the job's next other event, so
# every epoch's last Progress is there and GetJob is at most this far behind.
# Prometheus still counts every call.
PROGRESS_INTERVAL_SECONDS = 0.25


class Clock(Protocol):
    """Wall time for the records, monotonic time for deadlines."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True)
class Placement:
    """Where a placed job runs, as its STARTING transition says."""

    reason: str
    devices: tuple[str, ...]


class RunnerFactory(Protocol):
    """Makes the runner of a placed job (a local worker, a Ray job)."""

    def placement(self, record: JobRecord, assignment: Assignment) -> Placement: ...

    def runner(
        self, record: JobRecord, assignment: Assignment, on_event: OnEvent, on_end: OnEnd
    ) -> Runner: ...

    def abandon(self, record: JobRecord) -> None:
        """Make sure nothing runs on for a job that ends without a runner (best effort)."""


class JobObserver(Protocol):
    """Told of every event of every job once it is stored (its first, QUEUED, too).

    Called on the loop's thread, in the order of the events: it must return
    quickly (hand slow work to a thread of its own) and may post messages to
    the loop, but never wait for their answer there.
    """

    def job_event(self, record: JobRecord, event: Event) -> None: ...


# -- messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class SubmitJob:
    """Queue a job, or answer with the one `owner` submitted under `request_id`."""

    spec: JobSpec
    demand: Demand  # what validating the spec found it needs of this host
    owner: str
    request_id: str = ""


@dataclass(frozen=True)
class CancelJob:
    job_id: str


@dataclass(frozen=True)
class WorkerReported:
    job_id: str
    event: WorkerEvent


@dataclass(frozen=True)
class RunEnded:
    job_id: str
    outcome: RunOutcome


@dataclass(frozen=True)
class InLoop:
    """Run `decide` on the loop's thread: a decision that must not interleave with the loop's.

    (Deleting a data set's version: no submission is admitted on it between
    the check that no job uses it and the delete.)
    """

    decide: Callable[[], Any]


@dataclass(frozen=True)
class Tick:
    """Time passed: enforce deadlines and dispatch what waiting alone lets start."""


@dataclass(frozen=True)
class StopAdmitting:
    """The server is shutting down: admit and dispatch nothing more; runs checkpoint and end."""


@dataclass(frozen=True)
class StopRuns:
    """The shutdown's grace is over: end the runs still going (they resume on the next start)."""


Message = (
    SubmitJob | CancelJob | WorkerReported | RunEnded | Tick | StopAdmitting | StopRuns | InLoop
)
# The inbox's order: callers' requests first, then runners' reports and timers
# (among themselves first come, first handled, so a runner's events keep their order).
ASKED, REPORTED = 0, 1


@dataclass(frozen=True)
class LoopSnapshot:
    """The loop's own state as readers may see it, replaced whole after every message."""

    closed: bool = False
    running: Mapping[str, Assignment] = field(default_factory=lambda: MappingProxyType({}))
    queue_length: int = 0


@dataclass
class _Run:
    """A job the loop started, and what it keeps of its run."""

    runner: Runner
    strategy: str
    priority: int
    started: float  # monotonic
    deadline: float | None  # monotonic: max_runtime_seconds ends the run here
    # Preempted before: not preempted again until it ran min_run_seconds.
    resumed_after_preemption: bool = False
    step: int = 0  # the global step it reached
    checkpoint_step: int = 0  # the global step of its newest checkpoint
    progressed: bool = False  # the first Progress came in
    stopped: bool = False  # the loop asked it to end now
    preempted_by: str | None = None  # asked to checkpoint and stop for this job
    stop_deadline: float | None = None  # monotonic: killed here if still running
    last_heard: float | None = None  # monotonic: its runner's last event (a heartbeat, too)
    held_progress: Progress | None = None  # newer than the stored one: stored when due
    progress_stored_at: float = float("-inf")  # monotonic: its last Progress stored


_QUIT = object()


class JobController:
    """Owns job state: handles messages one at a time, on its thread or in a test's hands.

    Args:
        demand_of: what a job needs of this host (validation); called when a
            job is queued again after a restart, since the host may have changed.
        on_idle: called when nothing runs or waits (fill the warm pool).
        observers: told of each job's events as they are stored (tracking, experiments).
        preemption_grace_seconds: how long a preempted run may take to reach its next
            compiled-call boundary and checkpoint before it is killed (it then
            resumes from its last checkpoint).
        min_run_seconds: a job resumed after a preemption is not preempted again
            before its run is this old (no thrash).
        hang_seconds: a local run whose worker sent nothing for this long is killed
            and handled as a worker death (0: never).
        progress_interval_seconds: a job's history keeps at most one Progress per
            this many seconds (0: every one); see PROGRESS_INTERVAL_SECONDS.
        max_queue_per_owner: jobs one owner may have waiting, so that none fills
            the queue for the others (0: no share; the anonymous owner of a
            server without authentication has none).
        dataset_exists: whether a pushed data set's version (NAME@sha256:...) is
            still stored, asked as a job pinned to one is admitted.
    """

    def __init__(
        self,
        store: Store,
        *,
        scheduler: Scheduler,
        runners: RunnerFactory,
        feed: JobFeed,
        metrics: JobMetrics,
        demand_of: Callable[[JobSpec], Demand],
        clock: Clock | None = None,
        on_idle: Callable[[], None] = lambda: None,
        observers: Sequence[JobObserver] = (),
        preemption_grace_seconds: float = PREEMPTION_GRACE_SECONDS,
        min_run_seconds: float = MIN_RUN_SECONDS,
        hang_seconds: float = HANG_SECONDS,
        progress_interval_seconds: float = PROGRESS_INTERVAL_SECONDS,
        max_queue_per_owner: int = 0,
        dataset_exists: Callable[[str], bool] = lambda reference: True,
    ):
        self.store = store
        self.scheduler = scheduler
        self.feed = feed
        self.metrics = metrics
        self._runner_factory = runners
        self._demand_of = demand_of
        self._clock = clock or SystemClock()
        self._on_idle = on_idle
        self._observers = tuple(observers)
        self._preemption_grace = preemption_grace_seconds
        self._min_run = min_run_seconds
        self._hang = hang_seconds
        self._progress_interval = progress_interval_seconds
        self._max_queue_per_owner = max_queue_per_owner
        self._dataset_exists = dataset_exists
        # Jobs whose end could not be recorded (the store failed), and why they end.
        self._unsettled: dict[str, str] = {}
        self._settle_again: float | None = None
        # (ASKED or REPORTED, arrival number, (message, future) or _QUIT)
        self._inbox: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._arrivals = itertools.count()  # thread-safe enough: next() holds the GIL
        self._runs: dict[str, _Run] = {}
        self._closed = False
        self._counts_changed = True
        self._thread: threading.Thread | None = None
        self.snapshot = LoopSnapshot()

    # -- for everyone else: post, call, read ---------------------------------------

    def post(self, message: Message) -> Future:
        """Hand the loop a message; the future holds its answer once handled."""
        future: Future = Future()
        rank = REPORTED if isinstance(message, WorkerReported | RunEnded | Tick) else ASKED
        self._inbox.put((rank, next(self._arrivals), (message, future)))
        return future

    def call(self, message: Message, timeout: float | None = None) -> Any:
        """Post a message and wait for its answer (or its exception).

        When the loop's thread does not run (tests), the inbox is handled here, now.
        """
        future = self.post(message)
        if self._thread is None:
            self.process_pending()
        return future.result(timeout)

    def process_pending(self) -> int:
        """Handle every message in the inbox now; returns how many (the test seam)."""
        handled = 0
        while True:
            try:
                *_, item = self._inbox.get_nowait()
            except queue.Empty:
                return handled
            if item is not _QUIT:
                self._handle(*item)
                handled += 1

    def tick(self) -> None:
        """Time passed (a test moved its clock): enforce deadlines, dispatch."""
        self.call(Tick())

    # -- start and stop --------------------------------------------------------------

    def recover(self) -> None:
        """Take over the jobs an earlier server left unfinished, then start what can run."""
        for record in self.store.unfinished_jobs():
            self._recover(record)
        self._dispatch()
        self._publish()

    def start(self) -> None:
        """Recover, then handle messages on a thread of the loop's own until `shutdown`."""
        self.recover()
        self._thread = threading.Thread(target=self._serve, name="job-controller", daemon=True)
        self._thread.start()

    def shutdown(self, grace: float) -> None:
        """Stop admitting; runs checkpoint at their next compiled-call boundary and end.

        Runs not ended within `grace` seconds are killed: they resume from their
        last checkpoint on the next start, as the ones that ended in time do.
        Their jobs keep their state in the store; queued jobs stay queued.
        """
        runners = self.call(StopAdmitting())
        deadline = time.monotonic() + grace
        for runner in runners:
            runner.join(max(0.0, deadline - time.monotonic()))
        self.call(StopRuns())
        for runner in runners:
            runner.join(STOPPED_RUNNER_SECONDS)
        if self._thread is not None:
            self._inbox.put((REPORTED, next(self._arrivals), _QUIT))
            self._thread.join(STOPPED_RUNNER_SECONDS)
        # Nothing runs for this server any more: every watcher may end.
        self.snapshot = LoopSnapshot(closed=True, queue_length=self.scheduler.queue_length)
        self.feed.wake_all()

    def _serve(self) -> None:
        while True:
            try:
                *_, item = self._inbox.get(timeout=self._seconds_to_next_deadline())
            except queue.Empty:
                item = (Tick(), None)
            if item is _QUIT:
                return
            self._handle(*item)

    def _seconds_to_next_deadline(self) -> float | None:
        """Until the loop must act though no message came (None: not before one comes)."""
        now = self._clock.monotonic()
        deadlines = []
        for run in self._runs.values():
            if run.held_progress is not None:
                deadlines.append(run.progress_stored_at + self._progress_interval)
            if run.stopped:
                continue
            if run.deadline is not None:
                deadlines.append(run.deadline)
            if run.stop_deadline is not None:
                deadlines.append(run.stop_deadline)
            if self._watches_for_hangs(run):
                deadlines.append(self._hung_at(run))
            preemptible_again = run.started + self._min_run
            if run.resumed_after_preemption and self.scheduler.queue_length:
                if preemptible_again > now:  # a waiting job may preempt it then
                    deadlines.append(preemptible_again)
        wakeup = self.scheduler.next_wakeup()
        if wakeup is not None:
            deadlines.append(wakeup)
        if self._settle_again is not None:
            deadlines.append(self._settle_again)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    # -- one message ---------------------------------------------------------------------

    def _handle(self, message: Message, future: Future | None) -> None:
        try:
            result = self._decide(message)
        except Exception as error:
            if future is None or isinstance(message, WorkerReported | RunEnded | Tick):
                # Runners and timers wait for no answer: the failure is logged, and
                # the job it concerns still gets an owner's answer. A ServiceError
                # (a full disk) is one line: its reason says it all.
                if isinstance(error, ServiceError):
                    log.warning(
                        "job %s: the job controller could not handle %s: %s",
                        getattr(message, "job_id", "-"),
                        type(message).__name__,
                        error,
                    )
                else:
                    log.exception("the job controller failed on %s", type(message).__name__)
            if isinstance(message, WorkerReported | RunEnded):
                self._after_failure(message.job_id, error)
            if future is not None:
                future.set_exception(error)
        else:
            if future is not None:
                future.set_result(result)
        finally:
            self._publish()

    def _after_failure(self, job_id: str, error: Exception) -> None:
        """Bookkeeping of a job failed (a store that cannot be written): end it with the reason.

        A run still going is stopped, and its end recorded when it comes; a
        run already over is recorded FAILED now, or at the next try.
        """
        run = self._runs.get(job_id)
        reason = f"the server could not record the job: {reason_line(error)}"
        if run is not None:
            if not run.stopped:
                run.stopped = True
                run.runner.stop(Stop(RunEnd.FAILED, reason))
            return
        self._unsettled[job_id] = reason
        self._settle()

    def _settle(self) -> None:
        """Record FAILED for the jobs whose end could not be recorded; the rest wait a retry."""
        for job_id, reason in list(self._unsettled.items()):
            try:
                record = self.feed.record(job_id)
                if not record.finished:
                    self._finish(record, JobState.FAILED, reason, 0.0)
            except Exception as error:
                log.warning("job %s: still cannot record its end: %s", job_id, error)
                continue
            del self._unsettled[job_id]
        self._settle_again = None
        if self._unsettled:
            self._settle_again = self._clock.monotonic() + SETTLE_RETRY_SECONDS

    def _decide(self, message: Message) -> Any:
        if isinstance(message, WorkerReported):
            return self._worker_reported(message.job_id, message.event)
        if isinstance(message, RunEnded):
            return self._run_ended(message.job_id, message.outcome)
        if isinstance(message, SubmitJob):
            return self._submit(message)
        if isinstance(message, CancelJob):
            return self._cancel(message.job_id)
        if isinstance(message, Tick):
            return self._enforce_deadlines()
        if isinstance(message, StopAdmitting):
            return self._stop_admitting()
        if isinstance(message, StopRuns):
            return self._stop_runs()
        if isinstance(message, InLoop):
            return message.decide()
        raise TypeError(f"the job controller takes no {message!r}")

    def _publish(self) -> None:
        """Replace the snapshot readers see, and the job counts when states changed."""
        self._publish_snapshot()
        if self._counts_changed:
            try:
                self.metrics.set_jobs_by_state(self.store.count_by_state())
                self.metrics.set_queue_length(self.scheduler.queue_length)
                self._counts_changed = False
            except Exception:  # a store that cannot be read: the loop goes on, counts later
                log.exception("could not count the jobs by state")

    def _publish_snapshot(self) -> None:
        self.snapshot = LoopSnapshot(
            closed=self._closed,
            running=MappingProxyType(self.scheduler.running),
            queue_length=self.scheduler.queue_length,
        )

    # -- decisions ------------------------------------------------------------------------

    def _submit(self, message: SubmitJob) -> JobRecord:
        if message.request_id:
            existing = self.store.find_by_request_id(message.owner, message.request_id)
            if existing is not None:
                # The same request names the same job, whichever version its data
                # set's name pointed at then and now.
                if existing.spec != replace(
                    message.spec, dataset_version=existing.spec.dataset_version
                ):
                    raise AlreadyExists(
                        f"request_id {message.request_id!r} was used for job "
                        f"{existing.job_id} with a different spec"
                    )
                return existing
        if self._closed:
            raise Unavailable("the server is shutting down")
        self.scheduler.check_admission(message.demand)
        self._check_share(message.owner)
        version = message.spec.dataset_version
        if version and not self._dataset_exists(version):
            raise FailedPrecondition(
                f"data set {shown(version)} was deleted as the job was submitted; submit it again"
            )
        now = self._clock.time()
        job_id = f"job-{uuid.uuid4().hex[:12]}"
        record = JobRecord(
            job_id=job_id,
            request_id=message.request_id or f"auto-{job_id}",
            spec=message.spec,
            state=JobState.QUEUED,
            create_time=now,
            owner=message.owner,
        )
        self._stored(self.store.create_job(record, now))
        self._counts_changed = True
        self.scheduler.enqueue(job_id, message.demand, priority=message.spec.priority)
        self._dispatch()
        return self.feed.record(job_id)

    def _check_share(self, owner: str) -> None:
        """Refuse a job whose owner has its share of the queue waiting already."""
        share = self._max_queue_per_owner
        if not share or not owner:
            return
        waiting = sum(
            1 for job_id in self.scheduler.waiting if self.feed.record(job_id).owner == owner
        )
        if waiting >= share:
            raise ResourceExhausted(
                f"{owner} has {waiting} jobs waiting, its share of the queue "
                f"(--max-queue-per-principal {share}); retry when some have started"
            )

    def _cancel(self, job_id: str) -> JobRecord:
        record = self.feed.record(job_id)
        if record.finished:
            raise FailedPrecondition(
                f"job {job_id} already ended {record.state.name}; only a queued or running "
                "job can be canceled"
            )
        run = self._runs.get(job_id)
        if run is None:  # still queued
            self.scheduler.remove(job_id)
            self._transition(job_id, JobState.CANCELED, "canceled while queued")
            self.metrics.job_finished(job_id, "canceled", 0.0)
            self._dispatch()
        else:
            if record.state is not JobState.CANCELLING:
                self._transition(job_id, JobState.CANCELLING, "cancel requested")
            run.stopped = True
            run.runner.stop(CANCEL)
        return self.feed.record(job_id)

    def _recover(self, record: JobRecord) -> None:
        if record.state is JobState.CANCELLING:
            self._runner_factory.abandon(record)  # the server may have stopped before it did
            self._transition(
                record.job_id, JobState.CANCELED, "the server stopped while cancelling"
            )
        elif record.state is JobState.QUEUED or record.spec.strategy == "multi_worker":
            # A multi_worker job's Ray job ran on without the server: it is followed again.
            self._enqueue(record)
        else:  # STARTING or RUNNING when the server ended (SIGTERM, kill -9, power loss)
            self._requeue(record, f"resumed {resume_point(record)} after a server restart")

    def _requeue(self, record: JobRecord, reason: str, *, front: bool = False) -> None:
        """Queue a job again; its worker resumes from its newest checkpoint."""
        self._transition(record.job_id, JobState.QUEUED, reason)
        self._enqueue(record, front=front)

    def _enqueue(self, record: JobRecord, *, front: bool = False) -> None:
        try:
            self.scheduler.enqueue(
                record.job_id,
                self._demand_of(record.spec),
                priority=record.spec.priority,
                front=front,
            )
        except Exception as error:  # the host changed under a queued job
            self._transition(record.job_id, JobState.FAILED, f"cannot run on this host: {error}")

    def _dispatch(self) -> None:
        """Start every queued job the scheduler can place now."""
        if self._closed:
            return
        for assignment in self.scheduler.next_runnable():
            try:
                self._start(assignment)
            except Exception as error:  # a store that cannot be written, a runner that fails
                log.exception("could not start job %s", assignment.job_id)
                self._runs.pop(assignment.job_id, None)
                self.scheduler.release(assignment.job_id)
                self._unsettled[assignment.job_id] = (
                    f"the server could not start the job: {reason_line(error)}"
                )
        self._settle()
        self._preempt_for_waiting()
        if not self._runs and not self.scheduler.queue_length:
            self._on_idle()

    def _start(self, assignment: Assignment) -> None:
        job_id = assignment.job_id
        record = self.feed.record(job_id)
        if record.state is JobState.QUEUED:  # else a Ray job followed again after a restart
            placement = self._runner_factory.placement(record, assignment)
            self._transition(
                job_id,
                JobState.STARTING,
                placement.reason,
                strategy=assignment.strategy,
                devices=placement.devices,
            )
            record = self.feed.record(job_id)
        runner = self._runner_factory.runner(record, assignment, *self._reports_of(job_id))
        started = self._clock.monotonic()
        limit = record.spec.max_runtime_seconds
        checkpoint_step = record.checkpoint.step if record.checkpoint else 0
        self._runs[job_id] = _Run(
            runner=runner,
            strategy=assignment.strategy,
            priority=record.spec.priority,
            started=started,
            deadline=started + limit if limit else None,
            resumed_after_preemption=record.preemptions > 0,
            step=checkpoint_step,
            checkpoint_step=checkpoint_step,
        )
        runner.start()

    def _preempt_for_waiting(self) -> None:
        """Ask lower-priority runs to checkpoint and stop, for waiting jobs that cannot start.

        The most urgent waiting job first; a job whose victims are stopping
        already waits for them (and holds its reservation) without more.
        """
        waiting_for = {run.preempted_by for run in self._runs.values() if run.preempted_by}
        now = self._clock.monotonic()
        for job_id in self.scheduler.waiting:
            if job_id in waiting_for:
                continue
            candidates = [
                Candidate(
                    job_id=other,
                    priority=run.priority,
                    lost_steps=max(0, run.step - run.checkpoint_step),
                    started=run.started,
                )
                for other, run in self._runs.items()
                if not (run.stopped or run.preempted_by)
                and not (run.resumed_after_preemption and now - run.started < self._min_run)
            ]
            victims = self.scheduler.preemption_victims(job_id, candidates)
            if not victims:
                continue
            self.scheduler.reserve(job_id)
            for victim in victims:
                run = self._runs[victim]
                run.preempted_by = job_id
                run.stop_deadline = now + self._preemption_grace
                run.runner.request_stop(f"preempted by {job_id}")
            log.info("job %s preempts %s", job_id, ", ".join(victims))

    def _reports_of(self, job_id: str) -> tuple[OnEvent, OnEnd]:
        """The callbacks a job's runner reports with: each posts a message to the loop."""

        def on_event(event: WorkerEvent) -> None:
            self.post(WorkerReported(job_id, event))

        def on_end(outcome: RunOutcome) -> None:
            self.post(RunEnded(job_id, outcome))

        return on_event, on_end

    def _hung_at(self, run: _Run) -> float:
        """When the run is taken for hung if nothing more comes from it.

        Until its worker's first word, the start may take longer: a cold
        worker imports TensorFlow on a host that may be busy.
        """
        if run.last_heard is None:
            return run.started + max(self._hang, STARTUP_SECONDS)
        return run.last_heard + self._hang

    def _watches_for_hangs(self, run: _Run) -> bool:
        """Local runs only: a Ray job is followed by polling Ray, which has its own limits."""
        return bool(self._hang) and run.strategy != "multi_worker" and not run.stopped

    def _enforce_deadlines(self) -> None:
        self._settle()
        now = self._clock.monotonic()
        for job_id, run in self._runs.items():
            if self._watches_for_hangs(run) and now >= self._hung_at(run):
                run.stopped = True
                run.runner.stop(
                    Stop(
                        RunEnd.WORKER_DIED,
                        f"the worker sent nothing for {self._hang:g} s: it hung, and was killed",
                    )
                )
            if run.stop_deadline is not None and now >= run.stop_deadline and not run.stopped:
                run.stopped = True
                run.runner.stop(
                    Stop(
                        RunEnd.STOPPED,
                        f"it did not stop within the preemption grace of "
                        f"{self._preemption_grace:g} s and was killed",
                    )
                )
            if run.deadline is not None and now >= run.deadline and not run.stopped:
                run.stopped = True
                limit = self.feed.record(job_id).spec.max_runtime_seconds
                run.runner.stop(
                    Stop(RunEnd.FAILED, f"the job ran past its max_runtime_seconds of {limit:g}")
                )
        self._dispatch()
        for job_id, run in list(self._runs.items()):
            if run.held_progress is not None and now >= run.progress_stored_at + (
                self._progress_interval
            ):
                self._store_held_progress(job_id, run)

    def _worker_reported(self, job_id: str, event: WorkerEvent) -> None:
        run = self._runs.get(job_id)
        if run is None:
            log.warning("an event of job %s, which has no run: %r", job_id, event)
            return
        run.last_heard = self._clock.monotonic()
        if isinstance(event, Running):
            if self.feed.record(job_id).state is JobState.STARTING:  # not when a cancel came first
                data = f"; data {event.data}" if event.data else ""
                self._transition(job_id, JobState.RUNNING, f"{event.replicas} replica(s){data}")
        elif isinstance(event, Resumed) and event.damaged:
            # Its newest checkpoint was damaged: the job's history says which, and from where.
            record = self.feed.record(job_id)
            self._transition(job_id, record.state, event.describe_fallback())
        elif isinstance(event, Progress):
            run.step = event.step
            if not run.progressed:
                run.progressed = True
                since_submit = self._clock.time() - self.feed.record(job_id).create_time
                self.metrics.job_first_step(job_id, since_submit)
            if self._clock.monotonic() - run.progress_stored_at >= self._progress_interval:
                run.held_progress = None
                run.progress_stored_at = self._clock.monotonic()
                self._append(job_id, event)
            else:
                run.held_progress = event
        if isinstance(event, EpochEnd | TrainingResult):
            self._store_held_progress(job_id, run)
            self._append(job_id, event)
        elif isinstance(event, CheckpointSaved):
            run.checkpoint_step = event.step
            self.store.record_checkpoint(job_id, event)
            self.feed.changed(job_id)
        report_metrics(self.metrics, job_id, run.strategy, event)

    def _run_ended(self, job_id: str, outcome: RunOutcome) -> None:
        """A run is over: free its devices, then record the job's end, or queue it again."""
        run = self._runs.get(job_id)
        if run is not None and not self.feed.record(job_id).finished:
            self._store_held_progress(job_id, run)
        run = self._runs.pop(job_id, None)
        self.scheduler.release(job_id)
        # Readers see the devices free before they can see the job's end: a
        # client told CANCELED or SUCCEEDED never finds the job still running.
        self._publish_snapshot()
        record = self.feed.record(job_id)
        run_seconds = self._clock.monotonic() - run.started if run else 0.0
        if record.finished:
            log.warning("job %s ended %s, and its run again: %s", job_id, record.state, outcome)
        elif outcome.end is RunEnd.SUCCEEDED:
            self._finish(record, JobState.SUCCEEDED, "", run_seconds)
        elif outcome.end is RunEnd.CANCELED:
            self._finish(record, JobState.CANCELED, outcome.reason, run_seconds)
        elif self._closed and outcome.end in (RunEnd.STOPPED, RunEnd.WORKER_DIED):
            # Stopped for the shutdown (on request, or killed after the grace), or
            # its worker died as the server stopped: it resumes on the next start.
            pass
        elif outcome.end is RunEnd.STOPPED and run is not None and run.preempted_by:
            count = self.store.count_preemption(job_id)
            self.metrics.job_preempted(job_id, run.strategy)
            self._requeue(
                record,
                f"preempted by {run.preempted_by} (preemption {count}); {outcome.reason}; "
                f"resumes {resume_point(record)}",
                front=True,
            )
        elif outcome.end is RunEnd.STOPPED:
            self._requeue(record, f"{outcome.reason}; resumes {resume_point(record)}")
        elif outcome.end is RunEnd.WORKER_DIED and record.restarts < record.spec.max_restarts:
            restarts = self.store.count_restart(job_id)
            self._requeue(
                record,
                f"{outcome.reason}; restart {restarts} of {record.spec.max_restarts}, "
                f"{resume_point(record)}",
            )
        else:  # FAILED, or a worker that died with no restart left
            reason = outcome.reason
            if record.restarts:
                reason = f"{reason} (after {record.restarts} restarts)"
            self._finish(record, JobState.FAILED, reason, run_seconds)
        self._dispatch()

    def _stop_admitting(self) -> list[Runner]:
        self._closed = True
        for run in self._runs.values():
            run.runner.request_stop("the server is shutting down")
        return [run.runner for run in self._runs.values()]

    def _stop_runs(self) -> None:
        for run in self._runs.values():
            if run.runner.is_alive():
                run.stopped = True
                run.runner.stop(SHUTDOWN)

    # -- writing a job's record ------------------------------------------------------------

    def _finish(self, record: JobRecord, state: JobState, reason: str, run_seconds: float) -> None:
        self._transition(record.job_id, state, reason)
        self.metrics.job_finished(record.job_id, state.name.lower(), run_seconds)
        # A worker killed in the middle of a save left its half-written shards; a
        # run would remove them as it starts, but this job runs no more.
        remove_leftovers(self.store.job_files(record.job_id).checkpoints, None)

    def _transition(
        self,
        job_id: str,
        state: JobState,
        reason: str = "",
        *,
        strategy: str | None = None,
        devices: tuple[str, ...] | None = None,
    ) -> None:
        run = self._runs.get(job_id)
        if run is not None:  # what it reported comes before what happened to it
            self._store_held_progress(job_id, run)
        event = self.store.append_event(
            job_id,
            StateChange(state=state, reason=reason),
            self._clock.time(),
            strategy=strategy,
            devices=devices,
            failure_reason=reason if state is JobState.FAILED else None,
        )
        self._stored(event)
        self._counts_changed = True

    def _store_held_progress(self, job_id: str, run: _Run) -> None:
        """Store the run's held Progress, if any (dropped, not retried, if the store fails)."""
        progress, run.held_progress = run.held_progress, None
        if progress is not None:
            run.progress_stored_at = self._clock.monotonic()
            self._append(job_id, progress)

    def _append(self, job_id: str, payload: JobEventPayload) -> None:
        self._stored(self.store.append_event(job_id, payload, self._clock.time()))

    def _stored(self, event: Event) -> None:
        """An event is in the store: wake its watchers, tell the observers."""
        self.feed.stored(event)
        if not self._observers:
            return
        record = self.feed.record(event.job_id)
        for observer in self._observers:
            try:
                observer.job_event(record, event)
            except Exception:  # an observer's bug must not stop the loop
                log.exception("%s failed on an event of job %s", observer, event.job_id)


def resume_point(record: JobRecord) -> str:
    """Where the job's newest checkpoint lets it go on from, in words."""
    checkpoint = record.checkpoint
    if checkpoint is None:
        return "from the start (no checkpoint yet)"
    if checkpoint.step_in_epoch:
        return f"from epoch {checkpoint.epoch + 1}, step {checkpoint.step_in_epoch} of it"
    return f"from epoch {checkpoint.epoch}"
