"""Proto messages to the protocol's dataclasses and back, field by field.

The one module that knows both sides of the contract: the servicer converts a
request here once, at the edge, and converts the answer back here. Nothing is
splatted from a dict into a message, so a renamed field fails the type checker
and the tests, not a client at run time.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import cast

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from ntrain.v1 import training_pb2 as pb

from naive_model.config import MAX_LAYERS, LayerSpec, TrainConfig
from ntrain.client.tensors import DTYPES, fill_tensor
from service.jobs.dataset_store import DatasetVersion
from service.jobs.dataset_uploads import UploadHeader
from service.jobs.errors import InvalidArgument
from service.jobs.server_status import ServerStatus
from service.jobs.store import Event, JobRecord
from service.jobs.validation import MAX_LABELS, MAX_STATE_FILTERS, check_labels
from service.protocol import (
    EpochEnd,
    Evaluation,
    JobSpec,
    JobState,
    LogLines,
    ModelDescription,
    ModelFilePart,
    Progress,
    StateChange,
    TrainingResult,
)

# A tensor's dimensions: Predict takes 2; numpy refuses more than 64.
MAX_TENSOR_RANK = 8

# -- requests -> protocol ----------------------------------------------------------


def job_spec_from_proto(message: pb.JobSpec) -> JobSpec:
    """Convert a JobSpec message; unset fields take the documented defaults.

    The defaults are `TrainConfig()`'s and `JobSpec`'s (the book's network and
    training). A number given is taken as given (an explicit zero batch size
    is an error, not a default: the field has presence), so a client never
    trains with a value it did not mean.
    """
    if len(message.layers) > MAX_LAYERS:  # before a dataclass is built for each
        raise InvalidArgument(
            f"layers must hold at most {MAX_LAYERS} layers, got {len(message.layers)}"
        )
    if len(message.labels) > MAX_LABELS:  # before each is checked
        raise InvalidArgument(
            f"labels must hold at most {MAX_LABELS} labels, got {len(message.labels)}"
        )
    defaults = TrainConfig()
    optimizer = message.optimizer
    layers = tuple(
        LayerSpec(units=layer.units, activation=layer.activation) for layer in message.layers
    )
    return JobSpec(
        train=TrainConfig(
            layers=layers or defaults.layers,
            initializer=message.initializer or defaults.initializer,
            optimizer=optimizer.name or defaults.optimizer,
            learning_rate=(
                optimizer.learning_rate
                if optimizer.HasField("learning_rate")
                else defaults.learning_rate
            ),
            momentum=optimizer.momentum,
            batch_size=(
                message.batch_size if message.HasField("batch_size") else defaults.batch_size
            ),
            epochs=message.epochs if message.HasField("epochs") else defaults.epochs,
            steps_per_execution=message.steps_per_execution,
            jit_compile=message.jit_compile,
            seed=message.seed,
            precision=message.precision or "float32",
        ),
        dataset=message.dataset,
        strategy=message.strategy.name or "auto",
        device_count=message.strategy.device_count,
        hosts=message.strategy.hosts,
        gpus_per_host=message.strategy.gpus_per_host,
        checkpoint_every_epochs=(
            message.checkpoint_every_epochs
            if message.HasField("checkpoint_every_epochs")
            else JobSpec.checkpoint_every_epochs
        ),
        max_runtime_seconds=message.max_runtime_seconds,
        max_restarts=(
            message.max_restarts if message.HasField("max_restarts") else JobSpec.max_restarts
        ),
        name=message.name,
        labels=tuple(sorted(message.labels.items())),
        priority=message.priority,
        data_mode=message.data_mode or "auto",
    )


# Fields the checks name by their TrainConfig or JobSpec name, where the message
# nests them: `learning_rate` is JobSpec.optimizer.learning_rate.
_NESTED_SPEC_FIELDS = {
    "optimizer": "optimizer.name",
    "learning_rate": "optimizer.learning_rate",
    "momentum": "optimizer.momentum",
    "strategy": "strategy.name",
    "device_count": "strategy.device_count",
}


@contextlib.contextmanager
def fields_under(message_field: str) -> Iterator[None]:
    """Name the fields of InvalidArgument errors raised inside by their path in the request.

    A check of a JobSpec names `batch_size`; in a SubmitJobRequest that field
    is `spec.batch_size`, the path a client's BadRequest field violation gives.
    """
    try:
        yield
    except InvalidArgument as error:
        if not error.field:
            raise
        head, dot, rest = error.field.partition(".")
        field = _NESTED_SPEC_FIELDS.get(head, head) + dot + rest
        raise InvalidArgument(error.message, field=f"{message_field}.{field}") from None


def labels_from_proto(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The label filter of a ListJobs request, checked as a job's labels are."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"labels must hold at most {MAX_LABELS} labels, got {len(labels)}")
    pairs = tuple(sorted(labels.items()))
    check_labels(pairs)
    return pairs


def states_from_proto(values: Sequence[int]) -> tuple[JobState, ...]:
    """The job states of a ListJobs filter.

    Raises:
        InvalidArgument: an unspecified or unknown state, or too many of them.
    """
    if len(values) > MAX_STATE_FILTERS:
        raise InvalidArgument(
            f"states must hold at most {MAX_STATE_FILTERS} job states, got {len(values)}"
        )
    states = []
    for value in values:
        if value == pb.JOB_STATE_UNSPECIFIED or value not in pb.JobState.values():
            raise InvalidArgument(f"states holds an unknown job state {value}")
        states.append(JobState(value))
    return tuple(dict.fromkeys(states))  # each state once: one query parameter each


def predict_rows(request: pb.PredictRequest) -> list[np.ndarray]:
    """Each example's values as a float32 array, (values,), as the proto holds them.

    numpy copies the repeated field in C: a list of Python floats per example,
    checked value by value, took 5-10x as long for 1,024 MNIST-sized examples.
    """
    return [np.asarray(example.values, dtype=np.float32) for example in request.inputs]


def tensor_from_proto(tensor: pb.Tensor, field: str) -> np.ndarray:
    """The tensor's values as a read-only array over its bytes (no value is converted).

    Raises:
        InvalidArgument: an unknown dtype, too many or negative dimensions, or content whose
            size is not the shape's; the field violation names `field.dtype`,
            `field.shape` or `field.content`.
    """
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        known = ", ".join(pb.DataType.Name(value) for value in DTYPES)
        raise InvalidArgument(f"{field}.dtype must be one of {known}, got {tensor.dtype}")
    if len(tensor.shape) > MAX_TENSOR_RANK:  # before the sizes are read or shown
        raise InvalidArgument(
            f"{field}.shape must have at most {MAX_TENSOR_RANK} dimensions, got {len(tensor.shape)}"
        )
    shape = list(tensor.shape)
    if any(size < 0 for size in shape):
        raise InvalidArgument(f"{field}.shape must hold no negative size, got {shape}")
    expected = math.prod(shape) * dtype.itemsize  # a Python int: no overflow, however large
    content = tensor.content  # each read of a bytes field is a new copy (upb): one here
    if len(content) != expected:
        raise InvalidArgument(
            f"{field}.content must hold {expected} bytes ({shape} of "
            f"{pb.DataType.Name(tensor.dtype)}), got {len(content)}"
        )
    return np.frombuffer(content, dtype=dtype).reshape(shape)


# -- protocol -> responses ---------------------------------------------------------


def timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def job_spec_to_proto(spec: JobSpec) -> pb.JobSpec:
    train = spec.train
    return pb.JobSpec(
        layers=[
            pb.LayerSpec(units=layer.units, activation=layer.activation) for layer in train.layers
        ],
        initializer=train.initializer,
        optimizer=pb.OptimizerSpec(
            name=train.optimizer, learning_rate=train.learning_rate, momentum=train.momentum
        ),
        batch_size=train.batch_size,
        epochs=train.epochs,
        dataset=spec.dataset,
        strategy=pb.StrategySpec(
            name=spec.strategy,
            device_count=spec.device_count,
            hosts=spec.hosts,
            gpus_per_host=spec.gpus_per_host,
        ),
        steps_per_execution=train.steps_per_execution,
        jit_compile=train.jit_compile,
        seed=train.seed,
        precision=train.precision,
        checkpoint_every_epochs=spec.checkpoint_every_epochs,
        max_runtime_seconds=spec.max_runtime_seconds,
        max_restarts=spec.max_restarts,
        name=spec.name,
        labels=dict(spec.labels),
        priority=spec.priority,
        data_mode=spec.data_mode,
    )


def job_state_to_proto(state: JobState) -> pb.JobState:
    """The contract's value of a state (its number, too: a test holds both enums equal)."""
    # The stubs type the enum as an int subclass, Value() as a plain int.
    return cast(pb.JobState, pb.JobState.Value(f"JOB_STATE_{state.name}"))


def reason_line(reason: str) -> str:
    """A reason as clients show it: one line (a worker traceback may have many)."""
    return " ".join(reason.split())


def state_change_to_proto(change: StateChange, time: float) -> pb.StateTransition:
    return pb.StateTransition(
        state=job_state_to_proto(change.state),
        time=timestamp(time),
        reason=reason_line(change.reason),
    )


def progress_to_proto(progress: Progress) -> pb.Progress:
    return pb.Progress(
        epoch=progress.epoch,
        epochs=progress.epochs,
        step=progress.step,
        steps_per_epoch=progress.steps_per_epoch,
        step_in_epoch=progress.step_in_epoch,
        loss=progress.loss,
        accuracy=progress.accuracy,
        examples_per_second=progress.examples_per_second,
        examples=progress.examples,
    )


def epoch_end_to_proto(end: EpochEnd) -> pb.EpochSummary:
    summary = pb.EpochSummary(
        epoch=end.epoch,
        train_loss=end.train_loss,
        train_accuracy=end.train_accuracy,
        seconds=end.seconds,
    )
    if end.eval_loss is not None and end.eval_accuracy is not None:
        summary.eval_loss = end.eval_loss
        summary.eval_accuracy = end.eval_accuracy
    return summary


def result_to_proto(result: TrainingResult) -> pb.JobResult:
    return pb.JobResult(
        train_loss=result.train_loss,
        train_accuracy=result.train_accuracy,
        test_loss=result.test_loss,
        test_accuracy=result.test_accuracy,
        steps=result.steps,
        train_seconds=result.train_seconds,
        examples_per_second=result.examples_per_second,
        has_model=result.has_model,
        run_steps=result.steps if result.run_steps is None else result.run_steps,
    )


def model_to_proto(model: ModelDescription) -> pb.ModelInfo:
    return pb.ModelInfo(
        input_size=model.input_size,
        num_classes=model.num_classes,
        layers=[
            pb.LayerSpec(units=layer.units, activation=layer.activation) for layer in model.layers
        ],
        parameters=model.parameters,
        exported=model.exported,
        path=str(model.path),
        signature=model.signature,
        dataset=model.dataset,
    )


def job_to_proto(record: JobRecord, model: ModelDescription | None = None) -> pb.Job:
    job = pb.Job(
        job_id=record.job_id,
        request_id=record.request_id,
        spec=job_spec_to_proto(record.spec),
        state=job_state_to_proto(record.state),
        transitions=[
            state_change_to_proto(StateChange(state=t.state, reason=t.reason), t.time)
            for t in record.transitions
        ],
        create_time=timestamp(record.create_time),
        failure_reason=reason_line(record.failure_reason),
        devices=list(record.devices),
        strategy=record.strategy,
        restarts=record.restarts,
        preemptions=record.preemptions,
        dataset_version=record.spec.dataset_version,
        owner=record.owner,
    )
    if record.progress is not None:
        job.progress.CopyFrom(progress_to_proto(record.progress))
    if record.result is not None:
        job.result.CopyFrom(result_to_proto(record.result))
    if model is not None:
        job.model.CopyFrom(model_to_proto(model))
    return job


def log_lines_to_proto(lines: LogLines) -> pb.LogChunk:
    return pb.LogChunk(lines=lines.lines, next_offset=lines.next_offset)


def model_part_to_proto(part: ModelFilePart) -> pb.ModelChunk:
    return pb.ModelChunk(path=part.path, data=part.data, offset=part.offset, sha256=part.sha256)


@functools.lru_cache(maxsize=4096)
def event_to_proto(event: Event) -> pb.JobEvent:
    """The event as a message; cached, since every watcher of a job sends the same ones.

    Callers must not change the message they get.
    """
    message = pb.JobEvent(job_id=event.job_id, sequence=event.sequence, time=timestamp(event.time))
    payload = event.payload
    if isinstance(payload, StateChange):
        message.state_change.CopyFrom(state_change_to_proto(payload, event.time))
    elif isinstance(payload, Progress):
        message.progress.CopyFrom(progress_to_proto(payload))
    elif isinstance(payload, EpochEnd):
        message.epoch_end.CopyFrom(epoch_end_to_proto(payload))
    elif isinstance(payload, TrainingResult):
        message.result.CopyFrom(result_to_proto(payload))
    return message


def evaluation_to_proto(evaluation: Evaluation) -> pb.EvaluateResponse:
    return pb.EvaluateResponse(
        loss=evaluation.loss,
        accuracy=evaluation.accuracy,
        examples=evaluation.examples,
        dataset=evaluation.dataset,
        source=evaluation.source,
    )


def predictions_to_proto(probabilities: np.ndarray, *, as_tensor: bool) -> pb.PredictResponse:
    """(examples, classes) probabilities: one tensor, or one Prediction per example."""
    if as_tensor:
        response = pb.PredictResponse()
        fill_tensor(response.probabilities, probabilities)
        return response
    return pb.PredictResponse(
        predictions=[
            pb.Prediction(label=int(row.argmax()), probabilities=row.tolist())
            for row in probabilities
        ]
    )


def server_info_to_proto(status: ServerStatus) -> pb.ServerInfo:
    devices = [
        pb.Device(
            name=gpu.name,
            kind="GPU",
            memory_bytes=gpu.memory_bytes,
            description=gpu.description,
            busy=gpu.index in status.busy_gpus,
        )
        for gpu in status.inventory.gpus
    ]
    devices.append(
        pb.Device(
            name="CPU:0",
            kind="CPU",
            description=status.inventory.cpu_description,
            busy=status.cpu_jobs > 0,
        )
    )
    return pb.ServerInfo(
        version=status.version,
        tensorflow_version=status.tensorflow_version,
        python_version=status.python_version,
        devices=devices,
        strategies=list(status.strategies),
        queue_length=status.queue_length,
        running_jobs=status.running_jobs,
        warm_workers=status.warm_workers,
    )


# -- data sets -----------------------------------------------------------------------


def upload_header_from_proto(message: pb.DatasetUpload) -> UploadHeader:
    return UploadHeader(
        name=message.name,
        size_bytes=message.size_bytes,
        sha256=message.sha256,
        format=message.format,
        label_column=message.label_column,
        test_fraction=message.test_fraction if message.HasField("test_fraction") else None,
        num_classes=message.num_classes,
    )


def dataset_to_proto(version: DatasetVersion) -> pb.Dataset:
    manifest = version.manifest
    return pb.Dataset(
        name=version.name,
        digest=f"sha256:{version.digest}",
        owner=version.owner,
        create_time=timestamp(version.create_time),
        format=manifest.source_format,
        size_bytes=version.size_bytes,
        input_size=manifest.input_size,
        num_classes=manifest.num_classes,
        num_train=manifest.num_train,
        num_test=manifest.num_test,
        feature_dtype=manifest.feature_dtype,
        label_column=manifest.label_column,
        test_fraction=manifest.test_fraction or 0.0,
        stored_bytes=manifest.stored_bytes,
    )
