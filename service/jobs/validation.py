"""Checks of a request's fields, before anything is stored or started.

Every invalid value raises `InvalidArgument` naming the field and the value;
a job that can never run on this host raises `FailedPrecondition`. Nothing
here imports TensorFlow or gRPC: the API converts the proto message to the
protocol's dataclasses first, and these check the dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path

from naive_model.data import DatasetInfo
from service.jobs.datasets import lookup_dataset
from service.jobs.errors import InvalidArgument
from service.jobs.scheduler import Demand, demand_for
from service.protocol import JobSpec

# Activations of one step (forward values and their gradients) must fit too.
MAX_ACTIVATION_BYTES = 8 * 1024**3
MAX_REQUEST_ID_LENGTH = 128
# A year: past it a timer would overflow what the worker's wait accepts.
MAX_RUNTIME_SECONDS = 365 * 24 * 3600.0
MAX_RESTARTS = 100
MAX_PREDICT_INPUTS = 10_000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_JOB_ID = re.compile(r"^[a-z0-9-]{1,64}$")


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
    demand = demand_for(
        spec.strategy, spec.device_count, host_gpus, batch_size=spec.train.batch_size
    )
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
    # Each replica holds the model, its share of the activations and a whole
    # copy of the training data (images, int64 labels and order).
    needed = (
        spec.train.model_bytes(info.input_size)
        + activation_bytes // max(demand.replicas, 1)
        + info.device_bytes
    )
    if demand.gpus and gpu_memory_bytes and needed > gpu_memory_bytes:
        raise InvalidArgument(
            f"layers {[layer.units for layer in spec.train.layers]} with data set "
            f"{spec.dataset!r} ({info.device_bytes / 1024**2:,.0f} MiB on each GPU) need about "
            f"{needed / 1024**3:.1f} GiB per GPU, more than the "
            f"{gpu_memory_bytes / 1024**3:.1f} GiB a GPU of this host has"
        )
    if demand.gpus:
        demand = dataclasses.replace(demand, memory_bytes=needed)
    if spec.checkpoint_every_epochs < 0:
        raise InvalidArgument(
            "checkpoint_every_epochs must be 0 (only at the end) or positive, "
            f"got {spec.checkpoint_every_epochs}"
        )
    if not (
        math.isfinite(spec.max_runtime_seconds)
        and 0 <= spec.max_runtime_seconds <= MAX_RUNTIME_SECONDS
    ):
        raise InvalidArgument(
            f"max_runtime_seconds must be 0 (no limit) or a number of seconds up to "
            f"{MAX_RUNTIME_SECONDS:g}, got {spec.max_runtime_seconds!r}"
        )
    if not 0 <= spec.max_restarts <= MAX_RESTARTS:
        raise InvalidArgument(f"max_restarts must be in 0..{MAX_RESTARTS}, got {spec.max_restarts}")
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


def check_page(page_size: int, page_token: str) -> tuple[int, int | None]:
    """Page size and cursor of a ListJobs request.

    Returns:
        The page size (the default for 0) and the cursor (None for the first page).
    """
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be in 0..{MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE}), "
            f"got {page_size}"
        )
    cursor = None
    if page_token:
        if not page_token.isdigit() or len(page_token) > 18:
            raise InvalidArgument(f"page_token is not one this server gave, got {page_token!r}")
        cursor = int(page_token)
    return page_size or DEFAULT_PAGE_SIZE, cursor


def check_predict_inputs(rows: Sequence[Sequence[float]], input_size: int) -> None:
    """The inputs of a Predict request, checked against the model's input size."""
    if not rows:
        raise InvalidArgument("inputs must hold at least one example, got none")
    if len(rows) > MAX_PREDICT_INPUTS:
        raise InvalidArgument(
            f"inputs must hold at most {MAX_PREDICT_INPUTS} examples, got {len(rows)}"
        )
    for index, values in enumerate(rows):
        if len(values) != input_size:
            raise InvalidArgument(
                f"inputs[{index}] must hold the model's {input_size} values, got {len(values)}"
            )
        if not all(math.isfinite(value) for value in values):
            raise InvalidArgument(f"inputs[{index}] holds a non-finite value")
