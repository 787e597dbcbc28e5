"""The jobs' service: what the API asks of jobs, answered from snapshots and the control loop.

`JobManager` is what the servicer calls. Requests that change a job (submit,
cancel) are validated here and decided by the control loop
(`service.jobs.controller`), which alone writes job state; everything else
(get, list, watch, logs, models, Evaluate and Predict, status) reads: the
store through `JobFeed`, which answers from memory until a job changes, and
the loop's `LoopSnapshot`. Watchers read the store by sequence number and
sleep until their job's next event, so a reconnecting client that names its
last sequence misses nothing and sees nothing twice.

Each started job gets a runner (`service.jobs.runner`) from `Launcher`: a
worker process on this host, or a Ray job for multi_worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from service.devices import DeviceInventory
from service.jobs.access import (
    LOCAL,
    Action,
    Principal,
    authorize,
    authorize_priority,
    may_see_request_id,
)
from service.jobs.controller import (
    HANG_SECONDS,
    MIN_RUN_SECONDS,
    PREEMPTION_GRACE_SECONDS,
    PROGRESS_INTERVAL_SECONDS,
    CancelJob,
    Clock,
    InLoop,
    JobController,
    JobObserver,
    SubmitJob,
    SystemClock,
)
from service.jobs.dataset_store import DatasetStore
from service.jobs.datasets import lookup_dataset, resolve_dataset
from service.jobs.errors import FailedPrecondition, InvalidArgument, Unavailable
from service.jobs.feed import JobFeed
from service.jobs.launcher import Launcher
from service.jobs.model_tasks import (
    DEFAULT_MAX_TASKS,
    DEFAULT_MODEL_CACHE,
    ModelTasks,
    model_cache_bytes,
)
from service.jobs.outputs import describe_model, log_size, model_parts, read_log_lines
from service.jobs.ray_jobs import RayJobsClient
from service.jobs.reporting import JobMetrics
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
    JobSpec,
    JobState,
    LogLines,
    ModelDescription,
    ModelFilePart,
    ModelInfo,
    Predictions,
)

log = logging.getLogger(__name__)

CANCEL_WAIT_SECONDS = 30.0
WATCH_POLL_SECONDS = 1.0
# Jobs whose model GetJob keeps in memory (each kept until its job changes).
MODEL_CACHE_SIZE = 1024
# How often a followed log is read again for new lines (its job's events wake it too).
LOG_POLL_SECONDS = 0.5
# Why a followed job's stream ends before the job does: the client reconnects.
SHUTTING_DOWN = "the server is shutting down; the job goes on when it is back: reconnect"


class JobManager:
    """Accepts, queues, runs, cancels and reports jobs. Thread-safe."""

    def __init__(
        self,
        store: Store,
        *,
        inventory: DeviceInventory,
        metrics: JobMetrics,
        data_dir: Path | None = None,
        max_queue: int = 64,
        max_queue_per_owner: int = 0,
        max_cpu_jobs: int = 1,
        jobs_per_gpu: int = 1,
        backfill_seconds: float = BACKFILL_SECONDS,
        auto_gpu_wait_seconds: float = AUTO_GPU_WAIT_SECONDS,
        preemption_grace_seconds: float = PREEMPTION_GRACE_SECONDS,
        min_run_seconds: float = MIN_RUN_SECONDS,
        hang_seconds: float = HANG_SECONDS,
        progress_interval_seconds: float = PROGRESS_INTERVAL_SECONDS,
        warm_worker: bool = True,
        checkpoint_seconds: float | None = 300.0,
        max_model_tasks: int = DEFAULT_MAX_TASKS,
        model_cache: int = DEFAULT_MODEL_CACHE,
        worker_held_fds: tuple[int, ...] = (),
        ray: RayJobsClient | None = None,
        clock: Clock | None = None,
        observers: Sequence[JobObserver] = (),
        datasets: DatasetStore | None = None,
        data_budget_bytes: int = 0,
    ):
        clock = clock or SystemClock()
        self.store = store
        self.ray = ray  # multi_worker jobs go to this Ray cluster; None refuses them
        self.inventory = inventory
        self.metrics = metrics
        self.data_dir = data_dir
        self.datasets = datasets  # the data sets pushed to this server
        self.data_budget_bytes = data_budget_bytes
        # Workers' temporary files (TensorFlow's autograph writes some) stay in the
        # state directory: each worker's folder goes with it, and what a killed
        # server's workers left goes now (they ended before its lock was free).
        temp_root = store.state_dir / "tmp"
        shutil.rmtree(temp_root, ignore_errors=True)
        temp_root.mkdir(mode=0o700)
        self.pool = WorkerPool(
            warm=warm_worker,
            log_path=store.state_dir / "workers.log",
            # The default data set of `ntrain train`, loaded by the warm worker as it waits.
            dataset=("mnist", data_dir),
            held_fds=worker_held_fds,
            temp_root=temp_root,
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
            clock=clock.monotonic,
        )
        self.feed = JobFeed(store)
        # GetJob's model per job: (the job's last_sequence when read, the model).
        self._models: OrderedDict[str, tuple[int, ModelDescription | None]] = OrderedDict()
        self._models_lock = threading.Lock()
        self.controller = JobController(
            store,
            scheduler=self.scheduler,
            runners=Launcher(
                store,
                inventory=inventory,
                pool=self.pool,
                data_dir=data_dir,
                checkpoint_seconds=checkpoint_seconds,
                ray=ray,
                datasets=datasets,
                data_budget_bytes=data_budget_bytes,
                # Several beats to a hang limit, at most one every 5 s (0: no limit, no beats).
                heartbeat_seconds=min(5.0, hang_seconds / 4),
            ),
            feed=self.feed,
            metrics=metrics,
            demand_of=self._demand,
            clock=clock,
            on_idle=self._warm_up,
            observers=observers,
            dataset_exists=self._dataset_exists,
            max_queue_per_owner=max_queue_per_owner,
            preemption_grace_seconds=preemption_grace_seconds,
            min_run_seconds=min_run_seconds,
            hang_seconds=hang_seconds,
            progress_interval_seconds=progress_interval_seconds,
        )
        self.models = ModelTasks(
            store,
            InferenceWorker(
                model_cache=model_cache,
                cache_bytes=model_cache_bytes(),
                log_path=store.state_dir / "inference.log",
                dataset=("mnist", data_dir),  # the default data set's test split, for Evaluate
                held_fds=worker_held_fds,
                temp_root=temp_root,
            ),
            data_dir=data_dir,
            max_tasks=max_model_tasks,
            datasets=datasets,
        )

    # -- start and stop -------------------------------------------------------

    def start(self) -> None:
        """Recover jobs an earlier server left unfinished, then start what can run."""
        self.controller.start()
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
            # A job pinned to a pushed version is checked against that version.
            dataclasses.replace(spec, dataset=spec.dataset_version or spec.dataset),
            data_dir=self.data_dir,
            host_gpus=len(self.inventory.gpus),
            gpu_memory_bytes=self.gpu_memory_bytes,
            ray_enabled=self.ray is not None,
            datasets=self.datasets,
            data_budget_bytes=self.data_budget_bytes,
            runtime_bytes=self.pool.runtime_bytes,
        )
        return demand

    def check_spec(self, spec: JobSpec) -> None:
        """Raise InvalidArgument (or FailedPrecondition) when this host would refuse the job."""
        self._demand(spec)

    def _pinned(self, spec: JobSpec) -> JobSpec:
        """The spec with the version of the pushed data set it names, if it names one."""
        if self.datasets is None or spec.dataset_version:
            return spec
        resolved = resolve_dataset(spec.dataset, self.data_dir, datasets=self.datasets)
        if resolved.version is None:
            return spec  # a built-in, or a file of the data directory
        return dataclasses.replace(spec, dataset_version=resolved.version.reference)

    def _dataset_exists(self, reference: str) -> bool:
        return self.datasets is not None and self.datasets.find(reference) is not None

    def jobs_using(self, digest: str) -> list[str]:
        """The queued and running jobs pinned to the data set version `digest`."""
        unfinished = tuple(state for state in JobState if not state.finished)
        records, _ = self.store.list_jobs(states=unfinished, limit=1_000_000)
        return [
            record.job_id
            for record in records
            if record.spec.dataset_version.endswith(f"@sha256:{digest}")
        ]

    def delete_dataset(self, reference: str, *, principal: Principal = LOCAL) -> list:
        """Delete a pushed data set's version (or every version of a name).

        Decided in the control loop, so no job is admitted on the version
        between the check that no queued or running job uses it and the delete.

        Raises:
            NotFound, PermissionDenied, FailedPrecondition: see `DatasetStore.delete`.
            FailedPrecondition: this server takes no pushed data sets.
        """
        if self.datasets is None:
            raise FailedPrecondition("this server keeps no pushed data sets")
        datasets = self.datasets
        return self.controller.call(InLoop(lambda: datasets.delete(reference, principal=principal)))

    def shutdown(self, grace: float = 30.0) -> None:
        """Stop serving jobs; running ones checkpoint and resume on the next start.

        Each running worker is asked to save a checkpoint at its next
        compiled-call boundary and end; those not done within `grace` seconds
        are killed (they resume from their last checkpoint). Their jobs stay
        RUNNING in the store, and queued jobs stay queued.
        """
        self.controller.shutdown(grace)
        self.pool.close()
        self.models.close()

    def prewarm(self, count: int = 1) -> None:
        """Hold `count` warm workers now, though a job runs: the caller knows jobs follow.

        An experiment calls it when a trial starts and more trials are to come:
        the next trial then takes a worker with TensorFlow imported and the data
        set loaded (about 7 s on 2 cores), where waiting for the host to be idle
        would start that import only as the next trial is submitted. Extra warm
        workers beyond `count` are stopped.
        """
        self.pool.refill(count, shrink=True)

    def _warm_up(self) -> None:
        """Nothing runs or waits: import TensorFlow ahead of the next job and Evaluate."""
        self.pool.refill()
        if self.pool.warm_enabled:  # the inference worker, too, imports ahead when idle
            self.models.warm_up()

    # -- requests -------------------------------------------------------------

    def submit(
        self, spec: JobSpec, request_id: str = "", *, principal: Principal = LOCAL
    ) -> JobRecord:
        """Queue a job owned by `principal`, or return the one it submitted under `request_id`.

        Each owner has its own request_ids: the same key from two principals
        names two jobs. (`principal` defaults to the anonymous local caller of
        a server without authentication; the API always passes the caller.)

        Raises:
            PermissionDenied: the principal's role may not submit, or not at this priority.
            InvalidArgument: a field of `spec` is invalid.
            AlreadyExists: `request_id` names a job of this owner with another spec.
            FailedPrecondition: more GPUs than the host has.
            ResourceExhausted: the queue is full.
        """
        authorize(principal, Action.SUBMIT)
        authorize_priority(principal, spec.priority)
        spec = self._pinned(spec)
        demand = self._demand(spec)
        record = self.controller.call(
            SubmitJob(spec=spec, demand=demand, owner=principal.name, request_id=request_id)
        )
        return self._as_seen_by(principal, record)

    def get(self, job_id: str, *, principal: Principal = LOCAL) -> JobRecord:
        """The job as `principal` may see it (another owner's request_id is hidden).

        Served from memory until the job next changes.
        """
        return self._as_seen_by(principal, self.feed.record(job_id))

    def list(
        self,
        *,
        states: tuple[JobState, ...] = (),
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
        or when `is_active()` turns false (the client went away). When the
        server shuts down before the job ended, it raises `Unavailable` once
        the job has nothing more to report here: the job goes on after the next
        start, where the client reconnects with its last sequence.

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
            record = self.get(job_id)  # from memory: an idle watcher costs no query
            if record.last_sequence > last:
                continue
            if record.finished:
                return
            # After shutdown a job no runner holds has nothing more to say here; it
            # goes on when the server is back, where the client reconnects.
            loop = self.controller.snapshot
            if loop.closed and job_id not in loop.running:
                raise Unavailable(SHUTTING_DOWN)
            # Woken by this job's next event only, not by every job's.
            self.feed.wait_for_change(job_id, last, WATCH_POLL_SECONDS)
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
        spec = record.spec
        return describe_model(info, spec.train, files.model, spec.dataset_version or spec.dataset)

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
        ended and its log was read to the end, or `is_active()` turns false
        (the client went away). When the server shuts down first, it sends
        every whole line written, then raises `Unavailable`: the client
        reconnects from the offset it was given.

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
            ended = self.get(job_id).finished
            closing = self.controller.snapshot.closed
            lines = read_log_lines(path, offset, final=ended or not follow)
            if lines is not None:
                yield lines
                offset = lines.next_offset
                continue
            if not follow or ended or not is_active():
                return
            if closing:  # every whole line was sent: the rest comes after a reconnect
                raise Unavailable(SHUTTING_DOWN)
            # Log lines wake nobody; a state change does, and the poll finds new lines.
            self.feed.wait_for_change(job_id, self.get(job_id).last_sequence, LOG_POLL_SECONDS)

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
        if record.state is not JobState.SUCCEEDED or not files.has_model():
            raise FailedPrecondition(
                f"job {job_id} has no trained model (state {record.state.name}); "
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
        authorize(principal, Action.CANCEL, self.get(job_id).owner)
        record = self.controller.call(CancelJob(job_id))
        deadline = time.monotonic() + wait
        while not record.finished and (left := deadline - time.monotonic()) > 0:
            self.feed.wait_for_change(job_id, record.last_sequence, left)
            record = self.get(job_id)
        return self._as_seen_by(principal, record)

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
        loop = self.controller.snapshot
        running = loop.running
        busy = tuple(sorted(index for a in running.values() for index in a.gpus))
        queue_length = loop.queue_length
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
