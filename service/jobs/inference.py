"""Evaluate and Predict on a job's model: checked here, run in a worker process.

A task borrows a worker from the pool (the warm one when it is there), sends
it an `EvaluateTask` or `PredictTask`, and waits for the answer; the worker
runs on the CPU and ends after answering.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from naive_model.config import shown
from service.jobs.datasets import lookup_dataset
from service.jobs.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    WorkerError,
)
from service.jobs.runner import STOP_AFTER_ANSWER_SECONDS
from service.jobs.store import JobRecord, Store
from service.protocol import (
    EvaluateTask,
    Evaluation,
    Failed,
    ModelInfo,
    Predictions,
    PredictTask,
    Task,
    WorkerEvent,
)
from service.worker.pool import WorkerPool

TASK_TIMEOUT_SECONDS = 600.0
# Each task is a TensorFlow process with the model and perhaps a data set
# loaded (about 0.6 GiB and up): past this many at once, requests are refused.
DEFAULT_MAX_TASKS = 2
Answer = TypeVar("Answer", Evaluation, Predictions)


class ModelTasks:
    """Runs Evaluate and Predict tasks on jobs' models.

    Args:
        on_worker_returned: called after each task's worker ended (the job
            manager refills the warm pool then, when the host is idle).
        max_tasks: tasks running at once; one more is refused with
            `ResourceExhausted` at once rather than queued on a server thread.
    """

    def __init__(
        self,
        store: Store,
        pool: WorkerPool,
        *,
        data_dir: Path | None,
        on_worker_returned: Callable[[], None],
        max_tasks: int = DEFAULT_MAX_TASKS,
    ):
        if max_tasks < 1:
            raise ValueError(f"max_tasks must be at least 1, got {max_tasks}")
        self.store = store
        self.pool = pool
        self.data_dir = data_dir
        self.max_tasks = max_tasks
        self._slots = threading.BoundedSemaphore(max_tasks)
        self._on_worker_returned = on_worker_returned

    def evaluate(self, record: JobRecord, dataset: str, use_checkpoint: bool) -> Evaluation:
        """Loss and accuracy of the job's model (or latest checkpoint) on a test split."""
        job_id = record.job_id
        spec = record.spec
        name = dataset or spec.dataset
        info = lookup_dataset(name, self.data_dir, field="dataset")
        units = spec.train.layers[-1].units
        model_info = self._model_info(record)
        if model_info is not None:
            input_size = model_info.input_size
        else:
            input_size = lookup_dataset(spec.dataset, self.data_dir).input_size
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

    def _run_task(self, task: Task, answer_type: type[Answer]) -> Answer:
        """Run an Evaluate or Predict task in a worker process (on the CPU)."""
        name = type(task).__name__.removesuffix("Task").lower()
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"{name}: {self.max_tasks} Evaluate or Predict task(s) are running, the most "
                "this server runs at once (ntrain serve --max-model-tasks); retry later"
            )
        try:
            event = self._answer(task)
        finally:
            self._slots.release()
        if event is None:
            raise WorkerError(f"the worker did not answer in {TASK_TIMEOUT_SECONDS:.0f} s")
        if isinstance(event, Failed) and (event.data_missing or event.data_unusable):
            raise FailedPrecondition(f"{name}: {event.reason}")
        if not isinstance(event, answer_type):
            reason = event.reason if isinstance(event, Failed) else type(event).__name__
            raise WorkerError(f"{name} failed in its worker: {reason}")
        return event

    def _answer(self, task: Task) -> WorkerEvent | None:
        """The event a worker answers `task` with; None when it did not answer in time."""
        worker = self.pool.take()
        event: WorkerEvent | None
        try:
            worker.send(task)
            event = worker.receive(TASK_TIMEOUT_SECONDS)
        except (EOFError, OSError):
            event = Failed(reason=f"the worker exited with code {worker.stop()}")
        finally:
            worker.wait(STOP_AFTER_ANSWER_SECONDS)
            self._on_worker_returned()
        return event
