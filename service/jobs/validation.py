"""The edge of the service: proto messages to domain data and back, and validation.

A request is converted once, here, into plain dataclasses (`JobSpec` holding a
`naive_model.config.TrainConfig`) and checked field by field: every invalid
value raises `InvalidArgument` with the field's name and the value, before
anything is stored. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import functools
import math
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from ntrain.v1 import training_pb2 as pb

from naive_model.config import LayerSpec, TrainConfig
from naive_model.data import (
    DatasetInfo,
    DatasetNotFoundError,
    dataset_info,
    is_plain_file_name,
    mnist_candidates,
)
from service.errors import InvalidArgument
from service.scheduler import Demand, demand_for
from service.store import Event, JobRecord

BUILTIN_DATASETS = ("mnist", "synthetic")
# MNIST's shape, known without the file: the worker may still download it.
MNIST_INFO = DatasetInfo(
    name="mnist", input_size=784, num_classes=10, num_train=60000, num_test=10000
)
# Activations of one step (forward values and their gradients) must fit too.
MAX_ACTIVATION_BYTES = 8 * 1024**3
MAX_REQUEST_ID_LENGTH = 128
MAX_PREDICT_INPUTS = 10_000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_JOB_ID = re.compile(r"^[a-z0-9-]{1,64}$")


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A job as the service runs it: the training config plus where and how long."""

    train: TrainConfig
    dataset: str
    strategy: str = "auto"
    device_count: int = 0
    checkpoint_every_epochs: int = 0
    max_runtime_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for the store and for the worker process."""
        data = asdict(self)
        data["train"]["layers"] = [asdict(layer) for layer in self.train.layers]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        train = dict(data["train"])
        train["layers"] = tuple(LayerSpec(**layer) for layer in train["layers"])
        return cls(**{**data, "train": TrainConfig(**train)})


# -- requests -> domain --------------------------------------------------------


def job_spec_from_proto(message: pb.JobSpec) -> JobSpec:
    """Convert a JobSpec message; empty names take the documented defaults.

    Numbers are taken as given (a zero batch size is an error, not a default),
    so a client never trains with a value it did not mean.
    """
    optimizer = message.optimizer
    return JobSpec(
        train=TrainConfig(
            layers=tuple(
                LayerSpec(units=layer.units, activation=layer.activation)
                for layer in message.layers
            ),
            initializer=message.initializer or "glorot",
            optimizer=optimizer.name or "rmsprop",
            learning_rate=optimizer.learning_rate,
            momentum=optimizer.momentum,
            batch_size=message.batch_size,
            epochs=message.epochs,
            steps_per_execution=message.steps_per_execution,
            jit_compile=message.jit_compile,
            seed=message.seed,
        ),
        dataset=message.dataset,
        strategy=message.strategy.name or "auto",
        device_count=message.strategy.device_count,
        checkpoint_every_epochs=message.checkpoint_every_epochs,
        max_runtime_seconds=message.max_runtime_seconds,
    )


def check_dataset_name(name: str, field: str = "dataset") -> None:
    """A built-in name or a plain file name: never a path."""
    if not name:
        raise InvalidArgument(
            f"{field} must name a data set (mnist, synthetic, or a file in the server's "
            "data directory), got ''"
        )
    if not is_plain_file_name(name):
        raise InvalidArgument(
            f"{field} must be a plain file name inside the server's data directory, got {name!r}"
        )


def lookup_dataset(name: str, data_dir: Path | None, field: str = "dataset") -> DatasetInfo:
    """Sizes of a named data set, without loading TensorFlow.

    Raises:
        InvalidArgument: a bad name, a file that is missing or not a data set.
    """
    check_dataset_name(name, field)
    if name == "mnist" and not any(p.is_file() for p in mnist_candidates(data_dir=data_dir)):
        return MNIST_INFO  # the worker downloads it, or fails the job saying where it looked
    try:
        return _cached_info(name, data_dir, _file_identity(name, data_dir))
    except DatasetNotFoundError as error:
        raise InvalidArgument(f"{field}: {error}") from None
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise InvalidArgument(f"{field} {name!r} is not a usable data set: {error}") from None


def _file_identity(name: str, data_dir: Path | None) -> tuple:
    """What changes when the file behind a data set name changes (nothing for synthetic)."""
    if name == "synthetic":
        return ()
    if name == "mnist":
        paths = mnist_candidates(data_dir=data_dir)
    else:
        paths = [Path(data_dir) / name, Path(data_dir) / f"{name}.npz"] if data_dir else []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        return (str(path), stat.st_mtime_ns, stat.st_size)
    return ()


@functools.lru_cache(maxsize=64)
def _cached_info(name: str, data_dir: Path | None, identity: tuple) -> DatasetInfo:
    # Reading an .npz's labels takes a fraction of a second; a resubmission
    # (or the next job on the same file) should not pay it again.
    del identity  # part of the cache key only
    return dataset_info(name, data_dir=data_dir)


def validate_job_spec(
    spec: JobSpec, *, data_dir: Path | None, host_gpus: int, gpu_memory_bytes: int = 0
) -> tuple[Demand, DatasetInfo]:
    """Check every field of `spec` against the data set and the host.

    Args:
        host_gpus: GPUs the host has, to resolve the strategy's device count.
        gpu_memory_bytes: memory of the smallest GPU, 0 when unknown.

    Returns:
        What the job needs from the scheduler, and its data set's sizes.

    Raises:
        InvalidArgument: a field is invalid; the message names it and its value.
        FailedPrecondition: more GPUs than the host has.
    """
    if not spec.train.layers:
        raise InvalidArgument("layers must hold at least one layer, got none")
    info = lookup_dataset(spec.dataset, data_dir)
    demand = demand_for(spec.strategy, spec.device_count, host_gpus)
    try:
        spec.train.validate(
            input_size=info.input_size, num_classes=info.num_classes, num_replicas=demand.replicas
        )
    except ValueError as error:
        raise InvalidArgument(str(error)) from None
    if spec.train.batch_size > info.num_train:
        raise InvalidArgument(
            f"batch_size must be at most the data set's {info.num_train} training examples, "
            f"got {spec.train.batch_size}"
        )
    activation_bytes = (
        4 * 2 * spec.train.batch_size * sum(layer.units for layer in spec.train.layers)
    )
    if activation_bytes > MAX_ACTIVATION_BYTES:
        raise InvalidArgument(
            f"batch_size {spec.train.batch_size} with layers of "
            f"{[layer.units for layer in spec.train.layers]} units needs about "
            f"{activation_bytes / 1024**3:.1f} GiB of activations per step, more than the "
            f"{MAX_ACTIVATION_BYTES / 1024**3:.0f} GiB limit"
        )
    if demand.gpus and gpu_memory_bytes:
        needed = spec.train.model_bytes(info.input_size) + activation_bytes // max(
            demand.replicas, 1
        )
        if needed > gpu_memory_bytes:
            raise InvalidArgument(
                f"layers {[layer.units for layer in spec.train.layers]} need about "
                f"{needed / 1024**3:.1f} GiB per GPU, more than the "
                f"{gpu_memory_bytes / 1024**3:.1f} GiB a GPU of this host has"
            )
    if spec.checkpoint_every_epochs < 0:
        raise InvalidArgument(
            "checkpoint_every_epochs must be 0 (only at the end) or positive, "
            f"got {spec.checkpoint_every_epochs}"
        )
    if not math.isfinite(spec.max_runtime_seconds) or spec.max_runtime_seconds < 0:
        raise InvalidArgument(
            "max_runtime_seconds must be 0 (no limit) or a positive finite number, "
            f"got {spec.max_runtime_seconds!r}"
        )
    return demand, info


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable():
        raise InvalidArgument(
            f"request_id must be at most {MAX_REQUEST_ID_LENGTH} printable characters, "
            f"got {request_id[:40]!r}{'...' if len(request_id) > 40 else ''}"
        )


def check_job_id(job_id: str) -> None:
    if not _JOB_ID.match(job_id):
        raise InvalidArgument(f"job_id must be a job id such as 'job-1a2b3c4d5e6f', got {job_id!r}")


def page_request(request: pb.ListJobsRequest) -> tuple[int, int | None, tuple[str, ...]]:
    """Page size, cursor and state names of a ListJobs request."""
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be in 0..{MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE}), "
            f"got {request.page_size}"
        )
    cursor = None
    if request.page_token:
        if not request.page_token.isdigit() or len(request.page_token) > 18:
            raise InvalidArgument(
                f"page_token is not one this server gave, got {request.page_token!r}"
            )
        cursor = int(request.page_token)
    states = []
    for value in request.states:
        if value == pb.JOB_STATE_UNSPECIFIED or value not in pb.JobState.values():
            raise InvalidArgument(f"states holds an unknown job state {value}")
        states.append(pb.JobState.Name(value))
    return request.page_size or DEFAULT_PAGE_SIZE, cursor, tuple(states)


def predict_inputs(request: pb.PredictRequest, input_size: int) -> list[list[float]]:
    """The inputs of a Predict request, checked against the model's input size."""
    if not request.inputs:
        raise InvalidArgument("inputs must hold at least one example, got none")
    if len(request.inputs) > MAX_PREDICT_INPUTS:
        raise InvalidArgument(
            f"inputs must hold at most {MAX_PREDICT_INPUTS} examples, got {len(request.inputs)}"
        )
    rows = []
    for index, example in enumerate(request.inputs):
        values = list(example.values)
        if len(values) != input_size:
            raise InvalidArgument(
                f"inputs[{index}] must hold the model's {input_size} values, got {len(values)}"
            )
        if not all(math.isfinite(value) for value in values):
            raise InvalidArgument(f"inputs[{index}] holds a non-finite value")
        rows.append(values)
    return rows


# -- domain -> responses -------------------------------------------------------


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
        strategy=pb.StrategySpec(name=spec.strategy, device_count=spec.device_count),
        steps_per_execution=train.steps_per_execution,
        jit_compile=train.jit_compile,
        seed=train.seed,
        checkpoint_every_epochs=spec.checkpoint_every_epochs,
        max_runtime_seconds=spec.max_runtime_seconds,
    )


def job_to_proto(record: JobRecord) -> pb.Job:
    job = pb.Job(
        job_id=record.job_id,
        request_id=record.request_id,
        spec=job_spec_to_proto(JobSpec.from_dict(record.spec)),
        state=pb.JobState.Value(record.state),
        transitions=[
            pb.StateTransition(
                state=pb.JobState.Value(t.state), time=timestamp(t.time), reason=t.reason
            )
            for t in record.transitions
        ],
        create_time=timestamp(record.create_time),
        failure_reason=record.failure_reason,
        devices=list(record.devices),
        strategy=record.strategy,
    )
    if record.progress is not None:
        job.progress.CopyFrom(pb.Progress(**record.progress))
    if record.result is not None:
        job.result.CopyFrom(pb.JobResult(**record.result))
    return job


def event_to_proto(event: Event) -> pb.JobEvent:
    message = pb.JobEvent(job_id=event.job_id, sequence=event.sequence, time=timestamp(event.time))
    if event.kind == "state":
        message.state_change.CopyFrom(
            pb.StateTransition(
                state=pb.JobState.Value(event.data["state"]),
                time=timestamp(event.time),
                reason=event.data.get("reason", ""),
            )
        )
    elif event.kind == "progress":
        message.progress.CopyFrom(pb.Progress(**event.data))
    elif event.kind == "epoch_end":
        message.epoch_end.CopyFrom(pb.EpochSummary(**event.data))
    elif event.kind == "result":
        message.result.CopyFrom(pb.JobResult(**event.data))
    return message
