"""Evaluate and Predict on a job's model: checked here, answered by the inference worker.

Every task goes to one long-lived worker process (service.worker.serving) that
keeps recently used models and test splits loaded, on the CPU; tasks wait
their turn for it, and past `max_tasks` running or waiting a request is
refused at once. When that process dies during a task, the task is sent once
more, to a new process; when that one dies too, or a process hangs, the
request is answered UNAVAILABLE, and the next one starts a new process.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import TypeVar

from naive_model.config import RUNTIME_FALLBACK_BYTES, shown
from naive_model.npz import host_memory_bytes
from service.jobs.dataset_store import DatasetStore
from service.jobs.datasets import lookup_dataset, resolve_dataset
from service.jobs.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    WorkerError,
)
from service.jobs.store import JobRecord, Store
from service.jobs.validation import HOST_MEMORY_SHARE
from service.processes.inference_process import DEFAULT_MODEL_CACHE, InferenceWorker, WorkerGone
from service.protocol import (
    DescribeCache,
    EvaluateTask,
    Evaluation,
    Failed,
    ModelCacheState,
    ModelInfo,
    Predictions,
    PredictTask,
    WorkerEvent,
)

log = logging.getLogger(__name__)

TASK_TIMEOUT_SECONDS = 600.0
DESCRIBE_TIMEOUT_SECONDS = 60.0
# Tasks share the one inference worker and wait their turn for it: past this
# many running or waiting, requests are refused rather than queued on server threads.
DEFAULT_MAX_TASKS = 8
Answer = TypeVar("Answer", Evaluation, Predictions)

# DEFAULT_MODEL_CACHE is named here for service.api, which imports no service.worker module.
__all__ = ["DEFAULT_MAX_TASKS", "DEFAULT_MODEL_CACHE", "ModelTasks", "model_cache_bytes"]


def model_cache_bytes(host_bytes: int | None = None) -> int:
    """What the inference worker's kept models and test splits may take.

    A job's share of the host (as validation allows a training job) less
    the runtime's own footprint: the worker is counted as one more job. 0 when
    the host's memory is unknown (no bound but the model count). The process
    starts before any worker has measured the runtime, so its fallback counts.
    """
    host = host_memory_bytes() if host_bytes is None else host_bytes
    if not host:
        return 0
    return max(1, int(HOST_MEMORY_SHARE * host) - RUNTIME_FALLBACK_BYTES)


class ModelTasks:
    """Runs Evaluate and Predict tasks on jobs' models.

    Args:
        worker: the inference worker that answers the tasks, one at a time.
        max_tasks: tasks running or waiting for the worker at once; one more
            is refused with `ResourceExhausted` at once rather than queued on
            a server thread.
    """

    def __init__(
        self,
        store: Store,
        worker: InferenceWorker,
        *,
        data_dir: Path | None,
        max_tasks: int = DEFAULT_MAX_TASKS,
        datasets: DatasetStore | None = None,
    ):
        if max_tasks < 1:
            raise ValueError(f"max_tasks must be at least 1, got {max_tasks}")
        self.store = store
        self.worker = worker
        self.data_dir = data_dir
        self.datasets = datasets  # the pushed data sets a job or an Evaluate may name
        self.max_tasks = max_tasks
        self._slots = threading.BoundedSemaphore(max_tasks)

    def warm_up(self) -> None:
        """Start the inference worker ahead of the first task (when the host is idle)."""
        self.worker.warm_up()

    def close(self) -> None:
        """Stop the inference worker; a task in flight is answered UNAVAILABLE."""
        self.worker.close()

    def cache_state(self) -> ModelCacheState:
        """What the inference worker holds (starting it if it is not running).

        Raises:
            Unavailable: the worker ended before it answered.
        """
        try:
            event = self.worker.run(DescribeCache(), DESCRIBE_TIMEOUT_SECONDS)
        except WorkerGone as gone:
            raise Unavailable(str(gone)) from None
        if not isinstance(event, ModelCacheState):
            raise WorkerError(f"the inference worker answered {type(event).__name__}")
        return event

    def evaluate(self, record: JobRecord, dataset: str, use_checkpoint: bool) -> Evaluation:
        """Loss and accuracy of the job's model (or latest checkpoint) on a test split."""
        job_id = record.job_id
        spec = record.spec
        # By default, the very version of its data set the job trained on.
        name = dataset or spec.dataset_version or spec.dataset
        resolved = resolve_dataset(name, self.data_dir, field="dataset", datasets=self.datasets)
        info = resolved.info
        units = spec.train.layers[-1].units
        model_info = self._model_info(record)
        if model_info is not None:
            input_size = model_info.input_size
        else:
            input_size = lookup_dataset(
                spec.dataset_version or spec.dataset, self.data_dir, datasets=self.datasets
            ).input_size
        if info.input_size != input_size:
            raise InvalidArgument(
                f"dataset {shown(name)} has {info.input_size} features per example; "
                f"the model of job {job_id} takes {input_size}"
            )
        if info.num_classes > units:
            raise InvalidArgument(
                f"dataset {shown(name)} has {info.num_classes} classes; "
                f"the model of job {job_id} predicts {units}"
            )
        files = self.store.job_files(job_id)
        if use_checkpoint:
            if not files.has_checkpoint():
                raise FailedPrecondition(
                    f"job {job_id} has no checkpoint yet (state {record.state})"
                )
        else:
            self.require_model(record)
        task = EvaluateTask(
            job_dir=files.root,
            spec=spec,
            dataset=name,
            use_checkpoint=use_checkpoint,
            data_dir=self.data_dir,
            dataset_dir=None if resolved.version is None else resolved.version.folder,
        )
        return self._run_task(task, Evaluation)

    def predict(self, record: JobRecord, inputs) -> Predictions:
        """Class probabilities, (examples, classes), from the job's trained model."""
        self.require_model(record)
        task = PredictTask(job_dir=self.store.job_dir(record.job_id), inputs=inputs)
        return self._run_task(task, Predictions)

    def _model_info(self, record: JobRecord) -> ModelInfo | None:
        path = self.store.job_files(record.job_id).model_info
        if not path.is_file():
            return None
        return ModelInfo(**json.loads(path.read_text()))

    def require_model(self, record: JobRecord) -> ModelInfo:
        info = self._model_info(record)
        if info is None or not self.store.job_files(record.job_id).has_model():
            raise FailedPrecondition(
                f"job {record.job_id} has no trained model (state {record.state}); "
                "a model exists once the job has SUCCEEDED"
            )
        return info

    def _run_task(self, task: EvaluateTask | PredictTask, answer_type: type[Answer]) -> Answer:
        """Run an Evaluate or Predict task on the inference worker (on the CPU)."""
        name = type(task).__name__.removesuffix("Task").lower()
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"{name}: {self.max_tasks} Evaluate or Predict task(s) are running or waiting, "
                "the most this server takes at once (ntrain serve --max-model-tasks); retry later"
            )
        try:
            event = self._answer(name, task)
        finally:
            self._slots.release()
        if isinstance(event, Failed) and (event.data_missing or event.data_unusable):
            raise FailedPrecondition(f"{name}: {event.reason}")
        if not isinstance(event, answer_type):
            reason = event.reason if isinstance(event, Failed) else type(event).__name__
            raise WorkerError(f"{name} failed in its worker: {reason}")
        return event

    def _answer(self, name: str, task: EvaluateTask | PredictTask) -> WorkerEvent:
        """The worker's answer; a task whose worker died goes once more, to a new one.

        Raises:
            Unavailable: no worker answered (both died, one hung, or the server is closing).
        """
        try:
            return self.worker.run(task, TASK_TIMEOUT_SECONDS)
        except WorkerGone as gone:
            if not gone.may_retry:
                raise Unavailable(f"{name}: {gone}; retry later") from None
            log.warning("%s: %s; sending the task to a new inference worker", name, gone)
        try:
            return self.worker.run(task, TASK_TIMEOUT_SECONDS)
        except WorkerGone as gone:
            raise Unavailable(f"{name}: {gone}, twice; retry later") from None
