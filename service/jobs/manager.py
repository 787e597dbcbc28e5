"""The job manager: the life of every job, from submit to its last event.

States: QUEUED -> STARTING -> RUNNING -> SUCCEEDED | FAILED, and CANCELLING ->
CANCELED from STARTING or RUNNING (a QUEUED job is CANCELED at once). Each
change is an event in the store, with its time and, for FAILED, the reason.

Each started job gets a `JobRunner` thread that owns its worker process: it
sends the task, turns the worker's messages into events and metrics, enforces
the run-time limit, and ends the process (really: reaped, devices released)
before the job reports a terminal state. Watchers read the store by sequence
number and sleep on a condition that every new event wakes, so a reconnecting
client that names its last sequence misses nothing and sees nothing twice.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import platform
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from service import worker as worker_files
from service.devices import DeviceInventory
from service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    WorkerError,
)
from service.scheduler import Assignment, Scheduler, demand_for
from service.spec import JobSpec, lookup_dataset, validate_job_spec
from service.store import Event, JobRecord, Store
from service.workers import WorkerPool, WorkerProcess

log = logging.getLogger(__name__)

TASK_TIMEOUT_SECONDS = 600.0
STOP_AFTER_ANSWER_SECONDS = 10.0
CANCEL_WAIT_SECONDS = 30.0
WATCH_POLL_SECONDS = 1.0
_OUTCOMES = {"SUCCEEDED": "succeeded", "FAILED": "failed", "CANCELED": "canceled"}


class Metrics(Protocol):
    """The hooks of `service.metrics.ServiceMetrics` that the job manager calls."""

    def set_warm_workers(self, ready: int) -> None: ...
    def set_queue_length(self, length: int) -> None: ...
    def set_jobs_by_state(self, counts: dict[str, int]) -> None: ...
    def job_first_step(self, job_id: str, seconds_since_submit: float) -> None: ...
    def job_progress(self, job_id: str, strategy: str, **values: float) -> None: ...
    def job_epoch_evaluated(self, job_id: str, strategy: str, **values: float) -> None: ...
    def job_checkpoint_saved(self, job_id: str, strategy: str, seconds: float) -> None: ...
    def job_gpu_memory(
        self, job_id: str, strategy: str, device: str, bytes_in_use: int
    ) -> None: ...
    def job_finished(self, job_id: str, outcome: str, duration_seconds: float) -> None: ...


@dataclass(frozen=True)
class ServerStatus:
    version: str
    tensorflow_version: str
    python_version: str
    inventory: DeviceInventory
    busy_gpus: tuple[int, ...]
    strategies: tuple[str, ...]
    queue_length: int
    running_jobs: int
    cpu_jobs: int
    warm_workers: int


class JobManager:
    """Accepts, queues, runs, cancels and reports jobs. Thread-safe."""

    def __init__(
        self,
        store: Store,
        *,
        inventory: DeviceInventory,
        metrics: Metrics,
        data_dir: Path | None = None,
        max_queue: int = 64,
        max_cpu_jobs: int = 1,
        warm_worker: bool = True,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.inventory = inventory
        self.metrics = metrics
        self.data_dir = data_dir
        self.pool = WorkerPool(
            warm=warm_worker,
            log_path=store.state_dir / "workers.log",
            # The default data set of `ntrain train`, loaded by the warm worker as it waits.
            dataset=("mnist", str(data_dir) if data_dir else None),
        )
        self.scheduler = Scheduler(
            [gpu.index for gpu in inventory.gpus], max_cpu_jobs=max_cpu_jobs, max_queue=max_queue
        )
        self._clock = clock
        # One lock for the scheduler, the runners and event appends; the
        # condition on it wakes watchers whenever an event is stored.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._runners: dict[str, JobRunner] = {}
        self._closed = False

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

    def _recover(self, record: JobRecord) -> None:
        if record.state == "QUEUED":
            spec = JobSpec.from_dict(record.spec)
            try:
                demand = demand_for(spec.strategy, spec.device_count, len(self.inventory.gpus))
                self.scheduler.enqueue(record.job_id, demand)
                return
            except Exception as error:  # the host changed under a queued job
                self._transition(record.job_id, "FAILED", f"cannot run on this host: {error}")
                return
        if record.state == "CANCELLING":
            self._transition(record.job_id, "CANCELED", "the server stopped while cancelling")
        else:
            self._transition(
                record.job_id, "FAILED", f"the server stopped while the job was {record.state}"
            )

    def shutdown(self, timeout: float = 30.0) -> None:
        """End every worker; running jobs FAIL, queued ones stay queued for the next start."""
        with self._lock:
            self._closed = True
            runners = list(self._runners.values())
            for runner in runners:
                runner.stop("the server shut down while the job was running")
        deadline = time.monotonic() + timeout
        for runner in runners:
            runner.join(max(0.0, deadline - time.monotonic()))
        self.pool.close()
        with self._changed:
            self._changed.notify_all()

    # -- requests -------------------------------------------------------------

    def submit(self, spec: JobSpec, request_id: str = "") -> JobRecord:
        """Queue a job, or return the one already submitted under `request_id`.

        Raises:
            InvalidArgument: a field of `spec` is invalid.
            AlreadyExists: `request_id` names a job with another spec.
            FailedPrecondition: more GPUs than the host has.
            ResourceExhausted: the queue is full.
        """
        gpu_memory = min((gpu.memory_bytes for gpu in self.inventory.gpus), default=0)
        demand, _ = validate_job_spec(
            spec,
            data_dir=self.data_dir,
            host_gpus=len(self.inventory.gpus),
            gpu_memory_bytes=gpu_memory,
        )
        spec_dict = spec.to_dict()
        with self._lock:
            if request_id:
                existing = self.store.find_by_request_id(request_id)
                if existing is not None:
                    if existing.spec != json.loads(json.dumps(spec_dict)):
                        raise AlreadyExists(
                            f"request_id {request_id!r} was used for job {existing.job_id} "
                            "with a different spec"
                        )
                    return existing
            if self._closed:
                raise Unavailable("the server is shutting down")
            self.scheduler.check_admission(demand)
            now = self._clock()
            job_id = f"job-{uuid.uuid4().hex[:12]}"
            record = JobRecord(
                job_id=job_id,
                request_id=request_id or f"auto-{job_id}",
                spec=spec_dict,
                state="QUEUED",
                create_time=now,
            )
            self._stored(self.store.create_job(record, now))
            self.scheduler.enqueue(job_id, demand)
            self._dispatch()
            self._report_counts()
            return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        record = self.store.get_job(job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return record

    def list(
        self, *, states: tuple[str, ...] = (), page_size: int = 50, cursor: int | None = None
    ) -> tuple[list[JobRecord], int | None]:
        return self.store.list_jobs(states=states, limit=page_size, before=cursor)

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
            events = self.store.events_after(job_id, last)
            for event in events:
                yield event
                last = event.sequence
            if events:
                continue
            with self._changed:
                record = self.store.get_job(job_id)
                if record.last_sequence > last:
                    continue
                # After shutdown a job no runner holds (queued) has nothing more to say.
                if record.finished or (self._closed and job_id not in self._runners):
                    return
                self._changed.wait(WATCH_POLL_SECONDS)
            if not is_active():
                return

    def cancel(self, job_id: str, wait: float = CANCEL_WAIT_SECONDS) -> JobRecord:
        """Cancel a queued or running job; a finished job is returned unchanged.

        A running job reports CANCELED only after its worker process is gone and
        its devices are free; this waits up to `wait` seconds for that.
        """
        with self._lock:
            record = self.get(job_id)
            if record.finished:
                return record
            runner = self._runners.get(job_id)
            if runner is None:  # still queued
                self.scheduler.remove(job_id)
                self._transition(job_id, "CANCELED", "canceled while queued")
                self.metrics.job_finished(job_id, "canceled", 0.0)
                self._report_counts()
                return self.get(job_id)
            if record.state != "CANCELLING":
                self._transition(job_id, "CANCELLING", "cancel requested")
                self._report_counts()
            runner.stop("canceled")
        runner.join(wait)
        return self.get(job_id)

    def evaluate(self, job_id: str, dataset: str = "", use_checkpoint: bool = False) -> dict:
        """Loss and accuracy of the job's model (or latest checkpoint) on a test split."""
        record = self.get(job_id)
        spec = JobSpec.from_dict(record.spec)
        name = dataset or spec.dataset
        info = lookup_dataset(name, self.data_dir, field="dataset")
        units = spec.train.layers[-1].units
        model_info = self._model_info(record, need_model=False)
        if model_info is not None:
            input_size = model_info["input_size"]
        else:
            input_size = lookup_dataset(spec.dataset, self.data_dir).input_size
        if info.input_size != input_size:
            raise InvalidArgument(
                f"dataset {name!r} has {info.input_size} features per example; "
                f"the model of job {job_id} takes {input_size}"
            )
        if info.num_classes > units:
            raise InvalidArgument(
                f"dataset {name!r} has {info.num_classes} classes; "
                f"the model of job {job_id} predicts {units}"
            )
        job_dir = self.store.job_dir(job_id)
        if use_checkpoint:
            if not (job_dir / worker_files.CHECKPOINTS / "checkpoint").is_file():
                raise FailedPrecondition(
                    f"job {job_id} has no checkpoint yet (state {record.state})"
                )
        elif model_info is None:
            self._model_info(record, need_model=True)  # raises FailedPrecondition
        return self._run_task(
            {
                "kind": "evaluate",
                "job_dir": str(job_dir),
                "spec": record.spec,
                "dataset": name,
                "use_checkpoint": use_checkpoint,
                "data_dir": str(self.data_dir) if self.data_dir else None,
            }
        )

    def model_input_size(self, job_id: str) -> int:
        """Features per example of the job's trained model.

        Raises:
            FailedPrecondition: the job has no trained model yet.
        """
        return self._model_info(self.get(job_id), need_model=True)["input_size"]

    def predict(self, job_id: str, inputs: list[list[float]]) -> Any:
        """Class probabilities, (examples, classes), from the job's trained model."""
        record = self.get(job_id)
        self._model_info(record, need_model=True)
        answer = self._run_task(
            {"kind": "predict", "job_dir": str(self.store.job_dir(job_id)), "inputs": inputs}
        )
        return answer["probabilities"]

    def _model_info(self, record: JobRecord, *, need_model: bool) -> dict | None:
        path = self.store.job_dir(record.job_id) / worker_files.MODEL_INFO
        if not path.is_file():
            if need_model:
                raise FailedPrecondition(
                    f"job {record.job_id} has no trained model (state {record.state}); "
                    "a model exists once the job has SUCCEEDED"
                )
            return None
        return json.loads(path.read_text())

    def _run_task(self, task: dict[str, Any]) -> dict:
        """Run an Evaluate or Predict task in a worker process (on the CPU)."""
        worker = self.pool.take()
        try:
            worker.send(task)
            message = worker.receive(TASK_TIMEOUT_SECONDS)
        except (EOFError, OSError):
            message = ("failed", f"the worker exited with code {worker.stop()}")
        finally:
            worker.wait(STOP_AFTER_ANSWER_SECONDS)
            self._refill_when_idle()
        if message is None:
            raise WorkerError(f"the worker did not answer in {TASK_TIMEOUT_SECONDS:.0f} s")
        kind, data = message
        if kind == "data_missing":
            raise FailedPrecondition(f"{task['kind']}: {data}")
        if kind != "answer":
            raise WorkerError(f"{task['kind']} failed in its worker: {data}")
        return data

    def status(self) -> ServerStatus:
        with self._lock:
            running = self.scheduler.running
            busy = tuple(sorted(index for a in running.values() for index in a.gpus))
            queue_length = self.scheduler.queue_length
        strategies = ("auto", "cpu", "mirrored") + (("gpu",) if self.inventory.gpus else ())
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

    def _dispatch(self) -> None:
        """Start every queued job the scheduler can place now."""
        if self._closed:
            return
        for assignment in self.scheduler.next_runnable():
            self._transition(
                assignment.job_id,
                "STARTING",
                f"on {', '.join(assignment.devices)}",
                strategy=assignment.strategy,
                devices=assignment.devices,
            )
            runner = JobRunner(self, self.get(assignment.job_id), assignment)
            self._runners[assignment.job_id] = runner
            runner.start()
        self._refill_when_idle()

    def _refill_when_idle(self) -> None:
        with self._lock:
            idle = not self._runners and not self.scheduler.queue_length and not self._closed
        if idle:
            self.pool.refill()
        self.metrics.set_warm_workers(self.pool.warm_ready)

    def _transition(self, job_id: str, state: str, reason: str = "", **fields: Any) -> Event:
        if state == "FAILED":
            fields["failure_reason"] = reason
        return self.append(job_id, "state", {"state": state, "reason": reason}, **fields)

    def append(self, job_id: str, kind: str, data: dict[str, Any], **fields: Any) -> Event:
        """Store the job's next event and wake its watchers."""
        with self._changed:
            event = self.store.append_event(job_id, kind, data, self._clock(), **fields)
            self._stored(event)
            return event

    def _stored(self, event: Event) -> None:
        with self._changed:
            self._changed.notify_all()

    def _report_counts(self) -> None:
        self.metrics.set_jobs_by_state(self.store.count_by_state())
        self.metrics.set_queue_length(self.scheduler.queue_length)

    def mark_running(self, job_id: str, replicas: int) -> None:
        """Called by a runner when its worker starts training."""
        with self._lock:
            if self.get(job_id).state == "STARTING":  # not when a cancel came first
                self._transition(job_id, "RUNNING", f"{replicas} replica(s)")
                self._report_counts()

    def seconds_since_submit(self, record: JobRecord) -> float:
        return self._clock() - record.create_time

    def finish(self, runner: JobRunner, state: str, reason: str) -> None:
        """Called by a runner once its worker is gone: release devices, record the end."""
        with self._lock:
            self._runners.pop(runner.job_id, None)
            self.scheduler.release(runner.job_id)
            self._transition(runner.job_id, state, reason)
            self.metrics.job_finished(runner.job_id, _OUTCOMES[state], runner.run_seconds)
            self._dispatch()
            self._report_counts()


class JobRunner:
    """The thread that runs one job in one worker process."""

    def __init__(self, manager: JobManager, record: JobRecord, assignment: Assignment):
        self.manager = manager
        self.job_id = record.job_id
        self.record = record
        self.spec = JobSpec.from_dict(record.spec)
        self.assignment = assignment
        self._lock = threading.Lock()
        self._worker: WorkerProcess | None = None
        self._stop_reason: str | None = None
        self._started = time.monotonic()
        self._first_progress = True
        self._thread = threading.Thread(target=self._run, name=f"runner-{self.job_id}", daemon=True)

    @property
    def run_seconds(self) -> float:
        return time.monotonic() - self._started

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self, reason: str) -> None:
        """End the job: kill its worker; the thread then records the end."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
            worker = self._worker
        if worker is not None:
            worker.process.kill()  # the runner thread sees EOF, reaps it and reports

    def _task(self, job_dir: Path) -> dict[str, Any]:
        manager = self.manager
        return {
            "kind": "train",
            "job_dir": str(job_dir),
            "spec": self.record.spec,
            "strategy": self.assignment.strategy,
            "replicas": self.assignment.replicas,
            "cuda_visible_devices": self.assignment.cuda_visible_devices,
            "gpu_names": [f"GPU:{index}" for index in self.assignment.gpus],
            "data_dir": str(manager.data_dir) if manager.data_dir else None,
        }

    def _run(self) -> None:
        state, reason = "FAILED", "the job runner stopped unexpectedly"
        worker = None
        try:
            job_dir = self.manager.store.job_dir(self.job_id)
            job_dir.mkdir(parents=True, exist_ok=True)
            worker = self.manager.pool.take()
            with self._lock:
                self._worker = worker
                stopping = self._stop_reason is not None
            if stopping:
                worker.process.kill()
            state, reason = self._follow(worker, job_dir)
        except Exception as error:  # a bug here must still end the job and free its devices
            log.exception("job runner for %s failed", self.job_id)
            reason = f"internal error: {error}"
        finally:
            if worker is not None:
                code = worker.wait(STOP_AFTER_ANSWER_SECONDS)
                if state == "FAILED" and reason.startswith("the worker exited"):
                    reason = _worker_exit_reason(code, self.manager.store.job_dir(self.job_id))
            with self._lock:
                if state == "SUCCEEDED":
                    pass  # the result was in before the stop: the model exists
                elif self._stop_reason == "canceled":
                    state, reason = "CANCELED", "canceled"
                elif self._stop_reason is not None:
                    state, reason = "FAILED", self._stop_reason
            self.manager.finish(self, state, reason)

    def _follow(self, worker: WorkerProcess, job_dir: Path) -> tuple[str, str]:
        """Send the task and turn the worker's messages into events until it ends."""
        limit = self.spec.max_runtime_seconds
        deadline = self._started + limit if limit else None
        try:
            worker.send(self._task(job_dir))
            while True:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                message = worker.receive(timeout)
                if message is None:
                    self.stop(f"the job ran past its max_runtime_seconds of {limit:g}")
                    continue
                kind, data = message
                if kind == "result":
                    self.manager.append(self.job_id, "result", data)
                    return "SUCCEEDED", ""
                if kind in ("failed", "data_missing"):
                    return "FAILED", data
                self._handle(kind, data)
        except (EOFError, OSError):
            return "FAILED", "the worker exited"

    def _handle(self, kind: str, data: Any) -> None:
        manager, job_id, strategy = self.manager, self.job_id, self.assignment.strategy
        metrics = manager.metrics
        if kind == "running":
            manager.mark_running(job_id, data["replicas"])
        elif kind == "progress":
            if self._first_progress:
                self._first_progress = False
                metrics.job_first_step(job_id, manager.seconds_since_submit(self.record))
            manager.append(job_id, "progress", data["progress"])
            progress, seconds = data["progress"], data["seconds"]
            metrics.job_progress(
                job_id,
                strategy,
                epoch=progress["epoch"],
                batches=data["steps"],
                examples=data["examples"],
                loss=progress["loss"],
                accuracy=progress["accuracy"],
                examples_per_second=progress["examples_per_second"],
                step_seconds=seconds / data["steps"] if data["steps"] else 0.0,
            )
        elif kind == "epoch_end":
            manager.append(job_id, "epoch_end", data)
            metrics.job_epoch_evaluated(
                job_id, strategy, loss=data["eval_loss"], accuracy=data["eval_accuracy"]
            )
        elif kind == "checkpoint":
            metrics.job_checkpoint_saved(job_id, strategy, data["seconds"])
        elif kind == "gpu_memory":
            for device, in_use in data.items():
                metrics.job_gpu_memory(job_id, strategy, device, in_use)
        else:
            log.warning("job %s: unknown worker message %r", job_id, kind)


def _worker_exit_reason(code: int | None, job_dir: Path) -> str:
    if code is not None and code < 0:
        import signal

        name = signal.Signals(-code).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        reason = f"the worker process was killed by {name}{hint}"
    else:
        reason = f"the worker process exited with code {code}"
    log_path = job_dir / worker_files.TRAIN_LOG
    if log_path.is_file():
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        if tail:
            reason += f"; its log ends: {tail[-1][:300]}"
    return reason


def package_version(package: str) -> str:
    """The installed version of a distribution, without importing it."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""
