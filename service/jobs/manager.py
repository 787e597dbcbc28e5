"""The job manager: the life of every job, from submit to its last event.

States: QUEUED -> STARTING -> RUNNING -> SUCCEEDED | FAILED, and CANCELLING ->
CANCELED from STARTING or RUNNING (a QUEUED job is CANCELED at once). Each
change is an event in the store, with its time and, for FAILED, the reason.

Each started job gets a `JobRunner` thread that owns its worker process: it
sends the task, hands the worker's typed events back (the manager stores
them and updates the metrics), enforces the run-time limit, and ends the
process (really: reaped, devices released) before the job reports a terminal
state. Watchers read the store by sequence
number and sleep on a condition that every new event wakes, so a reconnecting
client that names its last sequence misses nothing and sees nothing twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from service.devices import DeviceInventory
from service.jobs.access import LOCAL, Action, Principal, authorize, may_see_request_id
from service.jobs.datasets import lookup_dataset
from service.jobs.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)
from service.jobs.feed import JobFeed
from service.jobs.lifecycle import JobLifecycle
from service.jobs.model_tasks import (
    DEFAULT_MAX_TASKS,
    DEFAULT_MODEL_CACHE,
    ModelTasks,
    model_cache_bytes,
)
from service.jobs.outputs import describe_model, log_size, model_parts, read_log_lines
from service.jobs.ray_jobs import RayJobsClient
from service.jobs.ray_runner import RayRunner
from service.jobs.reporting import JobMetrics
from service.jobs.runner import CANCELED, STOP_AFTER_ANSWER_SECONDS, JobRunner
from service.jobs.scheduler import (
    AUTO_GPU_WAIT_SECONDS,
    BACKFILL_SECONDS,
    Demand,
    Scheduler,
)
from service.jobs.server_status import ServerStatus, package_version
from service.jobs.store import Event, JobRecord, Store
from service.jobs.validation import validate_job_spec
from service.processes.inference_process import InferenceWorker
from service.processes.warm_pool import WorkerPool
from service.protocol import (
    SERVICE_STRATEGIES,
    Evaluation,
    JobEventPayload,
    JobSpec,
    LogLines,
    ModelDescription,
    ModelFilePart,
    ModelInfo,
    Predictions,
    StateChange,
)

log = logging.getLogger(__name__)

CANCEL_WAIT_SECONDS = 30.0
WATCH_POLL_SECONDS = 1.0
# Jobs whose model GetJob keeps in memory (each kept until its job changes).
MODEL_CACHE_SIZE = 1024
# How often a followed log is read again for new lines (its job's events wake it too).
LOG_POLL_SECONDS = 0.5


class JobManager(JobLifecycle):
    """Accepts, queues, runs, cancels and reports jobs. Thread-safe."""

    def __init__(
        self,
        store: Store,
        *,
        inventory: DeviceInventory,
        metrics: JobMetrics,
        data_dir: Path | None = None,
        max_queue: int = 64,
        max_cpu_jobs: int = 1,
        jobs_per_gpu: int = 1,
        backfill_seconds: float = BACKFILL_SECONDS,
        auto_gpu_wait_seconds: float = AUTO_GPU_WAIT_SECONDS,
        warm_worker: bool = True,
        checkpoint_seconds: float | None = 300.0,
        max_model_tasks: int = DEFAULT_MAX_TASKS,
        model_cache: int = DEFAULT_MODEL_CACHE,
        worker_held_fds: tuple[int, ...] = (),
        ray: RayJobsClient | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.ray = ray  # multi_worker jobs go to this Ray cluster; None refuses them
        self.inventory = inventory
        self.metrics = metrics
        self.data_dir = data_dir
        self.checkpoint_seconds = checkpoint_seconds
        self.pool = WorkerPool(
            warm=warm_worker,
            log_path=store.state_dir / "workers.log",
            # The default data set of `ntrain train`, loaded by the warm worker as it waits.
            dataset=("mnist", data_dir),
            held_fds=worker_held_fds,
        )
        self.gpu_memory_bytes = min((gpu.memory_bytes for gpu in inventory.gpus), default=0)
        self.scheduler = Scheduler(
            [gpu.index for gpu in inventory.gpus],
            max_cpu_jobs=max_cpu_jobs,
            max_queue=max_queue,
            jobs_per_gpu=jobs_per_gpu,
            gpu_memory_bytes=self.gpu_memory_bytes,
            backfill_seconds=backfill_seconds,
            auto_gpu_wait_seconds=auto_gpu_wait_seconds,
        )
        # Dispatches again when waiting alone lets a job start (Scheduler.next_wakeup).
        self._wakeup: threading.Timer | None = None
        self._clock = clock
        # One lock for the scheduler, the runners, event appends and the
        # record cache; a condition per watched job, on the same lock, wakes
        # that job's watchers when it changes.
        self._lock = threading.RLock()
        self.feed = JobFeed(store, self._lock)
        # GetJob's model per job: (the job's last_sequence when read, the model).
        self._models: OrderedDict[str, tuple[int, ModelDescription | None]] = OrderedDict()
        self._models_lock = threading.Lock()
        self._runners: dict[str, JobRunner | RayRunner] = {}
        self._closed = False
        self.models = ModelTasks(
            store,
            InferenceWorker(
                model_cache=model_cache,
                cache_bytes=model_cache_bytes(),
                log_path=store.state_dir / "inference.log",
                dataset=("mnist", data_dir),  # the default data set's test split, for Evaluate
                held_fds=worker_held_fds,
            ),
            data_dir=data_dir,
            max_tasks=max_model_tasks,
        )

    # -- start and stop -------------------------------------------------------

    def start(self) -> None:
        """Recover jobs an earlier server left unfinished, then start what can run."""
        with self._lock:
            for record in self.store.unfinished_jobs():
                self._recover(record)
            self._dispatch()
            self._report_counts()
        # Validating a job reads its data set's labels once; do it for the
        # default set now, so that the first submission does not wait for it.
        threading.Thread(target=self._look_up_default_dataset, daemon=True).start()

    def _look_up_default_dataset(self) -> None:
        try:
            lookup_dataset("mnist", self.data_dir)
        except Exception as error:  # only a head start: a submission will report it
            log.debug("could not look up mnist ahead of time: %s", error)

    def _demand(self, spec: JobSpec) -> Demand:
        """What the job needs of this host; validating the spec against it finds that out."""
        demand, _ = validate_job_spec(
            spec,
            data_dir=self.data_dir,
            host_gpus=len(self.inventory.gpus),
            gpu_memory_bytes=self.gpu_memory_bytes,
            ray_enabled=self.ray is not None,
            runtime_bytes=self.pool.runtime_bytes,
        )
        return demand

    def shutdown(self, grace: float = 30.0) -> None:
        """Stop serving jobs; running ones checkpoint and resume on the next start.

        Each running worker is asked to save a checkpoint at its next
        compiled-call boundary and end; those not done within `grace` seconds
        are killed (they resume from their last checkpoint). Their jobs stay
        RUNNING in the store, and queued jobs stay queued.
        """
        with self._lock:
            self._closed = True
            runners = list(self._runners.values())
            if self._wakeup is not None:
                self._wakeup.cancel()
        for runner in runners:
            runner.request_stop()
        deadline = time.monotonic() + grace
        for runner in runners:
            runner.join(max(0.0, deadline - time.monotonic()))
        for runner in runners:
            if runner.is_alive():
                runner.stop("the server shut down")
        for runner in runners:
            runner.join(STOP_AFTER_ANSWER_SECONDS + 5.0)
        self.pool.close()
        self.models.close()
        self.feed.wake_all()

    # -- requests -------------------------------------------------------------

    def submit(
        self, spec: JobSpec, request_id: str = "", *, principal: Principal = LOCAL
    ) -> JobRecord:
        """Queue a job owned by `principal`, or return the one it submitted under `request_id`.

        Each owner has its own request_ids: the same key from two principals
        names two jobs. (`principal` defaults to the anonymous local caller of
        a server without authentication; the API always passes the caller.)

        Raises:
            PermissionDenied: the principal's role may not submit.
            InvalidArgument: a field of `spec` is invalid.
            AlreadyExists: `request_id` names a job of this owner with another spec.
            FailedPrecondition: more GPUs than the host has.
            ResourceExhausted: the queue is full.
        """
        authorize(principal, Action.SUBMIT)
        demand = self._demand(spec)
        with self._lock:
            if request_id:
                existing = self.store.find_by_request_id(principal.name, request_id)
                if existing is not None:
                    if existing.spec != spec:
                        raise AlreadyExists(
                            f"request_id {request_id!r} was used for job {existing.job_id} "
                            "with a different spec"
                        )
                    return self._as_seen_by(principal, existing)
            if self._closed:
                raise Unavailable("the server is shutting down")
            self.scheduler.check_admission(demand)
            now = self._clock()
            job_id = f"job-{uuid.uuid4().hex[:12]}"
            record = JobRecord(
                job_id=job_id,
                request_id=request_id or f"auto-{job_id}",
                spec=spec,
                state="QUEUED",
                create_time=now,
                owner=principal.name,
            )
            self.feed.stored(self.store.create_job(record, now))
            self.scheduler.enqueue(job_id, demand)
            self._dispatch()
            self._report_counts()
            return self.get(job_id, principal=principal)

    def get(self, job_id: str, *, principal: Principal = LOCAL) -> JobRecord:
        """The job as `principal` may see it (another owner's request_id is hidden).

        Served from memory until the job next changes.
        """
        return self._as_seen_by(principal, self.feed.record(job_id))

    def list(
        self,
        *,
        states: tuple[str, ...] = (),
        labels: tuple[tuple[str, str], ...] = (),
        page_size: int = 50,
        cursor: int | None = None,
        principal: Principal = LOCAL,
    ) -> tuple[list[JobRecord], int | None]:
        """Every owner's jobs, newest first, as `principal` may see them (see `get`).

        Only jobs in one of `states` (none: any), carrying every one of `labels`.
        """
        records, next_cursor = self.store.list_jobs(
            states=states, labels=labels, limit=page_size, before=cursor
        )
        return [self._as_seen_by(principal, record) for record in records], next_cursor

    @staticmethod
    def _as_seen_by(principal: Principal, record: JobRecord) -> JobRecord:
        if may_see_request_id(principal, record.owner):
            return record
        return dataclasses.replace(record, request_id="")

    def watch(
        self, job_id: str, after_sequence: int = 0, *, is_active: Callable[[], bool] = lambda: True
    ) -> Iterator[Event]:
        """The job's events after `after_sequence`, then new ones as they come.

        The iterator ends once the job has ended and its last event was given,
        when the manager shut down and the job has nothing more to report (a
        queued job goes on after the next start), or when `is_active()` turns
        false (the client went away).

        Raises:
            NotFound: no such job (raised here, before iterating).
            InvalidArgument: a negative `after_sequence`.
        """
        if after_sequence < 0:
            raise InvalidArgument(f"after_sequence must be 0 or positive, got {after_sequence}")
        self.get(job_id)
        return self._follow(job_id, after_sequence, is_active)

    def _follow(self, job_id: str, last: int, is_active: Callable[[], bool]) -> Iterator[Event]:
        while True:
            events = self.feed.events_after(job_id, last)
            for event in events:
                yield event
                last = event.sequence
            if events:
                continue
            with self._lock:
                record = self.get(job_id)  # from memory: an idle watcher costs no query
                if record.last_sequence > last:
                    continue
                # After shutdown a job no runner holds (queued) has nothing more to say.
                if record.finished or (self._closed and job_id not in self._runners):
                    return
                # Woken by this job's next event only, not by every job's.
                self.feed.wait_for_change(job_id, WATCH_POLL_SECONDS)
            if not is_active():
                return

    def model(self, job_id: str) -> ModelDescription | None:
        """The job's model (None before its training started), exported or not yet.

        GetJob asks at every call, so the answer is kept per job until the job
        next changes (its `last_sequence`): the worker writes model.json before
        it reports RUNNING and exports the model before it reports the result,
        so every change of the model comes with a new event.
        """
        record = self.get(job_id)
        with self._models_lock:
            cached = self._models.get(job_id)
            if cached is not None and cached[0] == record.last_sequence:
                self._models.move_to_end(job_id)
                return cached[1]
        model = self._read_model(record)
        with self._models_lock:
            self._models[job_id] = (record.last_sequence, model)
            self._models.move_to_end(job_id)
            if len(self._models) > MODEL_CACHE_SIZE:
                self._models.popitem(last=False)
        return model

    def _read_model(self, record: JobRecord) -> ModelDescription | None:
        files = self.store.job_files(record.job_id)
        try:
            info = ModelInfo(**json.loads(files.model_info.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # not written yet (or being written as training starts)
        return describe_model(info, record.spec.train, files.model)

    def logs(
        self,
        job_id: str,
        offset: int = 0,
        *,
        follow: bool = False,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Iterator[LogLines]:
        """The job's training log from byte `offset`, as whole lines in bounded pieces.

        With `follow` it goes on as the worker writes, until the job has
        ended and its log was read to the end, the manager shuts down, or
        `is_active()` turns false (the client went away).

        Raises:
            NotFound: no such job (raised here, before iterating).
            InvalidArgument: a negative `offset`, or one past the log's end.
            FailedPrecondition: train.log is a symbolic link or no regular file.
        """
        if offset < 0:
            raise InvalidArgument(f"offset must be 0 or positive, got {offset}")
        self.get(job_id)
        size = log_size(self.store.job_files(job_id).train_log)
        if offset > size:  # a resumed stream names an offset it was given: never past the end
            raise InvalidArgument(
                f"offset must be at most the log's size ({size} bytes), got {offset}"
            )
        return self._follow_log(job_id, offset, follow, is_active)

    def _follow_log(
        self, job_id: str, offset: int, follow: bool, is_active: Callable[[], bool]
    ) -> Iterator[LogLines]:
        path = self.store.job_files(job_id).train_log
        while True:
            # The state is read before the file: a job that has ended wrote its last line.
            ended = self.get(job_id).finished or self._closed
            lines = read_log_lines(path, offset, final=ended or not follow)
            if lines is not None:
                yield lines
                offset = lines.next_offset
                continue
            if not follow or ended or not is_active():
                return
            with self._lock:
                # Log lines wake nobody; a state change does, and the poll finds new lines.
                self.feed.wait_for_change(job_id, LOG_POLL_SECONDS)

    def model_files(self, job_id: str, *, principal: Principal = LOCAL) -> Iterator[ModelFilePart]:
        """The files of the job's exported SavedModel, in bounded pieces.

        Raises:
            NotFound: no such job (raised here, before iterating).
            PermissionDenied: a trainer's job of another owner, or a viewer.
            FailedPrecondition: the job has no exported model.
        """
        record = self._model_job(job_id, principal)
        files = self.store.job_files(job_id)
        # The model is exported before the job reports its result: until then a
        # worker restarted from its checkpoint may export it again, replacing it.
        if record.state != "SUCCEEDED" or not files.has_model():
            raise FailedPrecondition(
                f"job {job_id} has no trained model (state {record.state}); "
                "a model exists once the job has SUCCEEDED"
            )
        return model_parts(files.model)

    def cancel(
        self, job_id: str, wait: float = CANCEL_WAIT_SECONDS, *, principal: Principal = LOCAL
    ) -> JobRecord:
        """Cancel a queued or running job.

        A running job reports CANCELED only after its worker process is gone and
        its devices are free; this waits up to `wait` seconds for that. A job
        already CANCELLING is waited for again.

        Raises:
            NotFound: no such job.
            PermissionDenied: a trainer's job of another owner, or a viewer.
            FailedPrecondition: the job has already ended (nothing to cancel).
        """
        with self._lock:
            record = self.get(job_id)
            authorize(principal, Action.CANCEL, record.owner)
            if record.finished:
                raise FailedPrecondition(
                    f"job {job_id} already ended {record.state}; only a queued or running "
                    "job can be canceled"
                )
            runner = self._runners.get(job_id)
            if runner is None:  # still queued
                self.scheduler.remove(job_id)
                self._transition(job_id, "CANCELED", "canceled while queued")
                self.metrics.job_finished(job_id, "canceled", 0.0)
                self._report_counts()
                return self.get(job_id, principal=principal)
            if record.state != "CANCELLING":
                self._transition(job_id, "CANCELLING", "cancel requested")
                self._report_counts()
            runner.stop(CANCELED)
        runner.join(wait)
        return self.get(job_id, principal=principal)

    def evaluate(
        self,
        job_id: str,
        dataset: str = "",
        use_checkpoint: bool = False,
        *,
        principal: Principal = LOCAL,
    ) -> Evaluation:
        """Loss and accuracy of the job's model (or latest checkpoint) on a test split.

        Raises:
            PermissionDenied: a trainer's job of another owner, or a viewer.
        """
        return self.models.evaluate(self._model_job(job_id, principal), dataset, use_checkpoint)

    def model_input_size(self, job_id: str, *, principal: Principal = LOCAL) -> int:
        """Features per example of the job's trained model (FailedPrecondition without one)."""
        return self.models.require_model(self._model_job(job_id, principal)).input_size

    def predict(self, job_id: str, inputs, *, principal: Principal = LOCAL) -> Predictions:
        """Class probabilities, (examples, classes), from the job's trained model."""
        return self.models.predict(self._model_job(job_id, principal), inputs)

    def _model_job(self, job_id: str, principal: Principal) -> JobRecord:
        """The job whose model `principal` wants to use, if it may."""
        record = self.get(job_id)
        authorize(principal, Action.USE_MODEL, record.owner)
        return record

    def status(self) -> ServerStatus:
        with self._lock:
            running = self.scheduler.running
            busy = tuple(sorted(index for a in running.values() for index in a.gpus))
            queue_length = self.scheduler.queue_length
        strategies = tuple(
            name for name in SERVICE_STRATEGIES if name != "gpu" or self.inventory.gpus
        ) + (("multi_worker",) if self.ray is not None else ())
        return ServerStatus(
            version=package_version("ntrain"),
            tensorflow_version=package_version("tensorflow"),
            python_version=platform.python_version(),
            inventory=self.inventory,
            busy_gpus=busy,
            strategies=strategies,
            queue_length=queue_length,
            running_jobs=len(running),
            cpu_jobs=sum(1 for assignment in running.values() if not assignment.gpus),
            warm_workers=self.pool.warm_ready,
        )

    # -- inside the lock ------------------------------------------------------

    def _transition(
        self,
        job_id: str,
        state: str,
        reason: str = "",
        *,
        strategy: str | None = None,
        devices: tuple[str, ...] | None = None,
    ) -> Event:
        with self._lock:
            event = self.store.append_event(
                job_id,
                StateChange(state=state, reason=reason),
                self._clock(),
                strategy=strategy,
                devices=devices,
                failure_reason=reason if state == "FAILED" else None,
            )
            self.feed.stored(event)
            return event

    def append(self, job_id: str, payload: JobEventPayload) -> Event:
        """Store the job's next event and wake its watchers."""
        with self._lock:
            event = self.store.append_event(job_id, payload, self._clock())
            self.feed.stored(event)
            return event

    def _report_counts(self) -> None:
        self.metrics.set_jobs_by_state(self.store.count_by_state())
        self.metrics.set_queue_length(self.scheduler.queue_length)
