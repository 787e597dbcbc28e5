"""Checks of a request's fields, before anything is stored or started.

Every invalid value raises `InvalidArgument` naming the field and the value;
a job that can never run on this host raises `FailedPrecondition`. Nothing
here imports TensorFlow or gRPC: the API converts the proto message to the
protocol's dataclasses first, and these check the dataclasses.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import math
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from naive_model import data
from naive_model.config import RUNTIME_FALLBACK_BYTES, shown
from naive_model.data import DatasetInfo
from naive_model.streaming import DATA_MODES, WINDOWS_HELD, plan_data
from service.jobs.dataset_store import DatasetStore
from service.jobs.datasets import lookup_dataset
from service.jobs.errors import FailedPrecondition, InvalidArgument
from service.jobs.scheduler import Demand, demand_for
from service.protocol import MAX_PRIORITY, MIN_PRIORITY, PRIORITY_CLASSES, JobSpec

# Activations of one step (forward values and their gradients) must fit too.
MAX_ACTIVATION_BYTES = 8 * 1024**3
# The share of the host's physical memory one job's estimated peak may take:
# the server, a warm worker and the operating system need the rest.
HOST_MEMORY_SHARE = 0.75
# The share of a GPU's memory a replica may take: the CUDA context and
# TensorFlow's allocator need the rest.
GPU_MEMORY_SHARE = 0.9
MAX_REQUEST_ID_LENGTH = 128
# A year: past it a timer would overflow what the worker's wait accepts.
MAX_RUNTIME_SECONDS = 365 * 24 * 3600.0
MAX_RESTARTS = 100
MAX_PREDICT_INPUTS = 10_000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A ListJobs filter names each state at most once or twice; more is no request
# a client means, and every entry costs a query parameter.
MAX_STATE_FILTERS = 64
_JOB_ID = re.compile(r"^[a-z0-9-]{1,64}$")
MAX_NAME_LENGTH = 128
# Labels as Kubernetes has them: a name of 63 characters at most, alphanumeric at
# both ends with - _ . inside; a key may have a DNS subdomain prefix and "/".
MAX_LABELS = 32
MAX_LABEL_PREFIX_LENGTH = 253
_LABEL_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_LABEL_PREFIX = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")


def validate_job_spec(
    spec: JobSpec,
    *,
    data_dir: Path | None,
    host_gpus: int,
    gpu_memory_bytes: int = 0,
    host_memory_bytes: int | None = None,
    ray_enabled: bool = False,
    datasets: DatasetStore | None = None,
    data_budget_bytes: int = 0,
    runtime_bytes: int = RUNTIME_FALLBACK_BYTES,
) -> tuple[Demand, DatasetInfo]:
    """Check every field of `spec` against the data set and the host.

    Args:
        host_gpus: GPUs the host has, to resolve the strategy's device count.
        gpu_memory_bytes: memory of the smallest GPU, 0 when unknown.
        host_memory_bytes: the host's physical memory; None reads it, 0 skips
            the check.
        ray_enabled: the server submits multi_worker jobs to a Ray cluster.
        datasets: the pushed data sets `spec.dataset` may name.
        data_budget_bytes: training data past this is streamed (data_mode
            "auto"), and admission counts the streaming window instead; 0
            means half the host's memory, as the worker takes it.
        runtime_bytes: a worker's resident size after its imports, as measured
            on this host (`WorkerPool.runtime_bytes`); the documented fallback
            until a worker has reported.

    Returns:
        What the job needs from the scheduler, and its data set's sizes.

    Raises:
        InvalidArgument: a field is invalid; the message names it and its value.
        FailedPrecondition: more GPUs than the host has, or more memory than a
            job may take of the host's or a GPU's (`naive_model.config.MemoryEstimate`),
            or a multi_worker job on a server without a Ray cluster.
    """
    if not spec.train.layers:
        raise InvalidArgument("layers must hold at least one layer, got none")
    if not spec.dataset:
        raise InvalidArgument(
            "dataset must name a data set (mnist, synthetic, or a file in the server's data "
            "directory), got none"
        )
    check_name(spec.name)
    check_labels(spec.labels)
    if spec.data_mode not in DATA_MODES:
        raise InvalidArgument(
            f"data_mode must be one of {', '.join(DATA_MODES)}, got {shown(spec.data_mode)}"
        )
    info = lookup_dataset(spec.dataset, data_dir, datasets=datasets)
    demand = demand_for(
        spec.strategy,
        spec.device_count,
        host_gpus,
        batch_size=spec.train.batch_size,
        hosts=spec.hosts,
        gpus_per_host=spec.gpus_per_host,
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
    # A streamed job holds windows of rows, not the data set: admission counts those.
    held = admitted_data(info, spec, data_budget_bytes or data.host_memory_bytes() // 2)
    # Each replica holds the model, its share of the activations and a whole
    # copy of the training data (images, int64 labels and order), or its window.
    needed = (
        spec.train.model_bytes(info.input_size)
        + activation_bytes // max(demand.replicas, 1)
        + held.device_bytes
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
    if not MIN_PRIORITY <= spec.priority <= MAX_PRIORITY:
        raise InvalidArgument(
            f"priority must be in {MIN_PRIORITY}..{MAX_PRIORITY} (low {PRIORITY_CLASSES['low']}, "
            f"normal 0, high {PRIORITY_CLASSES['high']}), got {spec.priority}"
        )
    if demand.remote:
        # The Ray nodes' memory is theirs to check: this host holds nothing of the job.
        if not ray_enabled:
            raise FailedPrecondition(
                "strategy multi_worker runs on a Ray cluster, and this server has none: "
                "start it with ntrain serve --ray-address http://HOST:8265"
            )
        return demand, info
    _check_memory(spec, held, demand, gpu_memory_bytes, host_memory_bytes, runtime_bytes)
    return demand, info


def admitted_data(info: DatasetInfo, spec: JobSpec, budget_bytes: int) -> DatasetInfo:
    """The data a job holds as admission counts it: the data set, or a streamed run's windows.

    A streamed run holds `WINDOWS_HELD` windows of rows and none of the test
    split (it is read a batch at a time): counted as a data set of that size.
    """
    plan = plan_data(
        info, batch_size=spec.train.batch_size, mode=spec.data_mode, budget_bytes=budget_bytes
    )
    if plan.window_batches is None:
        return info
    rows = WINDOWS_HELD * plan.window_batches * spec.train.batch_size
    return dataclasses.replace(info, num_train=min(info.num_train, rows), num_test=0)


def _check_memory(
    spec: JobSpec,
    info: DatasetInfo,
    demand: Demand,
    gpu_memory_bytes: int,
    host_memory_bytes: int | None,
    runtime_bytes: int,
) -> None:
    """Refuse a job whose estimated peak memory exceeds its share of the host or a GPU."""
    estimate = spec.train.memory_estimate(
        input_size=info.input_size,
        num_train=info.num_train,
        num_test=info.num_test,
        num_replicas=demand.replicas,
        feature_bytes=info.feature_bytes,
    )
    units = shown([layer.units for layer in spec.train.layers])
    on = f"{spec.train.optimizer}, batch {spec.train.batch_size}, {demand.replicas} replica(s)"
    if host_memory_bytes is None:
        host_memory_bytes = data.host_memory_bytes()
    # An auto job runs on the CPU when no GPU is free: the host must hold it all then.
    host_needed = estimate.host_bytes(
        runtime_bytes=runtime_bytes, on_gpus=bool(demand.gpus) and not demand.flexible
    )
    host_limit = int(HOST_MEMORY_SHARE * host_memory_bytes)
    if host_limit and host_needed > host_limit:
        raise FailedPrecondition(
            f"layers {units} ({on}) on {shown(spec.dataset)} need about {_gib(host_needed)} of "
            f"memory, more than the {_gib(host_limit)} a job may take "
            f"({HOST_MEMORY_SHARE:.0%} of this host's {_gib(host_memory_bytes)})"
        )
    gpu_limit = int(GPU_MEMORY_SHARE * gpu_memory_bytes)
    if demand.gpus and gpu_limit and estimate.per_device > gpu_limit:
        raise FailedPrecondition(
            f"layers {units} ({on}) need about {_gib(estimate.per_device)} per GPU, more "
            f"than the {_gib(gpu_limit)} a job may take ({GPU_MEMORY_SHARE:.0%} of the "
            f"{_gib(gpu_memory_bytes)} a GPU of this host has)"
        )


def _gib(count: int) -> str:
    return f"{count / 1024**3:.1f} GiB"


def check_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidArgument(
            f"name must be at most {MAX_NAME_LENGTH} printable characters, got {shown(name)}"
        )


def check_labels(labels: Sequence[tuple[str, str]]) -> None:
    """Keys and values as Kubernetes labels have them, and at most `MAX_LABELS` of them."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"labels must hold at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels:
        prefix, slash, name = key.rpartition("/")
        if not (
            _LABEL_NAME.fullmatch(name)
            and (
                not slash
                or (len(prefix) <= MAX_LABEL_PREFIX_LENGTH and _LABEL_PREFIX.fullmatch(prefix))
            )
        ):
            raise InvalidArgument(
                f"labels holds a key that is no label name (at most 63 letters, digits, "
                f"'-', '_' or '.', alphanumeric at both ends, after an optional DNS prefix "
                f"and '/'): {shown(key)}",
                field=f"labels[{shown(key)}]",
            )
        if value and not _LABEL_NAME.fullmatch(value):
            raise InvalidArgument(
                f"labels[{shown(key)}] must be empty or at most 63 letters, digits, '-', '_' "
                f"or '.', alphanumeric at both ends, got {shown(value)}",
                field=f"labels[{shown(key)}]",
            )


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable():
        raise InvalidArgument(
            f"request_id must be at most {MAX_REQUEST_ID_LENGTH} printable characters, "
            f"got {shown(request_id)}"
        )


def check_job_id(job_id: str) -> None:
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidArgument(
            f"job_id must be a job id such as 'job-1a2b3c4d5e6f', got {shown(job_id)}"
        )


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
    cursor = _cursor_of(page_token) if page_token else None
    return page_size or DEFAULT_PAGE_SIZE, cursor


# A page token is the cursor (the store's sequence number of the page's last
# job) packed with a version byte and a checksum, in base64url: opaque to
# clients, and anything this server did not make is refused by its length,
# alphabet (ASCII only: no Unicode digits reach int()) and checksum before it
# reaches a query. The checksum's key is no secret, and needs none: a forged
# cursor only names another place in the listing, and the query takes it as a
# bound parameter. Tokens stay valid across restarts of the server.
_TOKEN_KEY = b"ntrain.v1.ListJobs page token"
_TOKEN_VERSION = 1
_TOKEN_BODY = struct.Struct(">BQ")  # version, cursor
_TOKEN_DIGEST_BYTES = 6
_TOKEN = re.compile(r"[A-Za-z0-9_-]{20}")  # 15 bytes in base64url, unpadded


def page_token(cursor: int) -> str:
    """The next_page_token that makes `check_page` return `cursor`."""
    body = _TOKEN_BODY.pack(_TOKEN_VERSION, cursor)
    return base64.urlsafe_b64encode(body + _token_digest(body)).decode("ascii")


def _token_digest(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_TOKEN_DIGEST_BYTES, key=_TOKEN_KEY).digest()


def _cursor_of(page_token: str) -> int:
    refused = InvalidArgument(
        f"page_token must be a next_page_token this server gave, got {shown(page_token)}"
    )
    if not _TOKEN.fullmatch(page_token):
        raise refused
    raw = base64.urlsafe_b64decode(page_token)
    body, digest = raw[: _TOKEN_BODY.size], raw[_TOKEN_BODY.size :]
    if not hmac.compare_digest(digest, _token_digest(body)):
        raise refused
    version, cursor = _TOKEN_BODY.unpack(body)
    if version != _TOKEN_VERSION or not 0 < cursor < 2**63:
        raise refused
    return cursor


def check_predict_count(count: int, field: str = "inputs") -> None:
    """How many examples a Predict request holds: checked before anything is converted."""
    if not count:
        raise InvalidArgument(f"{field} must hold at least one example, got none")
    if count > MAX_PREDICT_INPUTS:
        raise InvalidArgument(
            f"{field} must hold at most {MAX_PREDICT_INPUTS} examples, got {count}"
        )


def check_predict_inputs(rows: Sequence[Sequence[float] | np.ndarray], input_size: int) -> None:
    """The inputs of a Predict request, checked against the model's input size."""
    check_predict_count(len(rows))
    for index, values in enumerate(rows):
        if len(values) != input_size:
            raise InvalidArgument(
                f"inputs[{index}] must hold the model's {input_size} values, got {len(values)}"
            )
        if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
            raise InvalidArgument(f"inputs[{index}] holds a non-finite value")


def check_predict_tensor(inputs: np.ndarray, input_size: int) -> None:
    """A Predict request's tensor: (examples, input_size), every value finite.

    Its dtype and byte count were checked as it was read (`service.api.convert`).
    """
    if inputs.ndim != 2 or inputs.shape[1] != input_size:
        raise InvalidArgument(
            f"tensor.shape must be [examples, {input_size}] (the model's input size), "
            f"got {list(inputs.shape)}"
        )
    check_predict_count(inputs.shape[0], "tensor.shape")
    if inputs.dtype.kind == "f":
        finite = np.isfinite(inputs).all(axis=1)  # (examples,)
        if not finite.all():
            index = int(np.flatnonzero(~finite)[0])
            raise InvalidArgument(f"tensor.content holds a non-finite value in example {index}")
