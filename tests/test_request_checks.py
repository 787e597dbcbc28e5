"""Request checks that need no server: page tokens, repeated-field bounds, echoed values."""

from __future__ import annotations

import pytest
from ntrain.v1 import training_pb2 as pb

from naive_model.config import shown
from service.api import convert
from service.api.status_codes import one_line
from service.jobs import validation
from service.jobs.errors import InvalidArgument
from service.protocol import JobState


@pytest.mark.parametrize("cursor", [1, 12345, 2**63 - 1])
def test_a_page_token_gives_back_its_cursor(cursor):
    token = validation.page_token(cursor)
    assert token.isascii() and len(token) == 20
    assert validation.check_page(0, token) == (validation.DEFAULT_PAGE_SIZE, cursor)


def _flipped(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


@pytest.mark.parametrize(
    "token",
    [
        "\u00b2",  # a Unicode digit: str.isdigit() says yes, int() says no
        "\uff11\uff12",  # fullwidth digits
        "12345",  # the old decimal form
        "1" * 20,
        "abc",
        "x" * 100_000,
        _flipped(validation.page_token(7)),
        validation.page_token(7) + "=",
        validation.page_token(0),  # checksummed, but no cursor this server gives
    ],
)
def test_a_page_token_this_server_did_not_make_is_invalid(token):
    with pytest.raises(InvalidArgument, match="page_token") as raised:
        validation.check_page(0, token)
    assert len(raised.value.message) < 250


def test_repeated_fields_are_bounded_before_any_work():
    with pytest.raises(InvalidArgument, match="at most 64 job states, got 250000"):
        convert.states_from_proto([pb.JOB_STATE_RUNNING] * 250_000)
    assert convert.states_from_proto(
        [pb.JOB_STATE_RUNNING, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING]
    ) == (JobState.RUNNING, JobState.QUEUED)
    layers = [pb.LayerSpec(units=1, activation="relu")] * 100_000
    with pytest.raises(InvalidArgument, match="at most 64 layers, got 100000"):
        convert.job_spec_from_proto(pb.JobSpec(layers=layers))
    with pytest.raises(InvalidArgument, match="at most 10000 examples, got 10001"):
        validation.check_predict_count(10_001)
    with pytest.raises(InvalidArgument, match="at least one example"):
        validation.check_predict_count(0)


def test_echoed_values_are_cut_to_about_100_characters():
    assert shown("relu") == "'relu'"
    long = shown("g" * 1_000_000)
    assert len(long) < 140 and long.endswith("... (1000000 characters)")
    with pytest.raises(InvalidArgument) as raised:
        validation.check_job_id("j" * 1_000_000)
    assert len(raised.value.message) < 250
    assert one_line("two\nlines  here") == "two lines here"
    assert len(one_line("x" * 10**6)) <= 1003


def _spec(*units: int, optimizer: str = "sgd", strategy: str = "cpu", devices: int = 0, **train):
    from naive_model.config import LayerSpec, TrainConfig
    from service.protocol import JobSpec

    layers = tuple(LayerSpec(units=u, activation="relu") for u in units[:-1])
    layers += (LayerSpec(units=units[-1], activation="softmax"),)
    config = TrainConfig(layers=layers, optimizer=optimizer, learning_rate=0.01, **train)
    return JobSpec(train=config, dataset="synthetic", strategy=strategy, device_count=devices)


# A worker's train task measured by benchmarks/memory_peak.py (TensorFlow 2.21 on a
# 2-core CPU host; one epoch, its evaluation, a checkpoint, the export), in each
# install the project documents: the runtime (resident bytes after the imports,
# as the worker reports it in Ready) and the peak resident memory (VmHWM) of the
# same process, MiB. The runtime differs by install, so the peak does too.
MEASURED = {
    "server": {
        "book_mnist": (590, 965),
        "wide_activations": (589, 991),
        "sgd_100k": (589, 1866),
        "adam_100k": (589, 2487),
        "sgd_100k_mirrored_2": (589, 2444),
        "sgd_300k": (589, 4292),
    },
    "server,ray": {
        "book_mnist": (634, 1008),
        "wide_activations": (634, 1014),
        "sgd_100k": (634, 1916),
        "adam_100k": (634, 2515),
        "sgd_100k_mirrored_2": (634, 2487),
        "sgd_300k": (633, 4341),
    },
    "server,dev,ray,bench": {
        "wide_activations": (750, 1132),
        "sgd_100k": (753, 2023),
        "adam_100k": (753, 2655),
        "book_mnist": (752, 1117),
    },
}


@pytest.mark.parametrize(
    "install,config", [(install, name) for install, runs in MEASURED.items() for name in runs]
)
def test_the_memory_estimate_covers_measured_peaks_closely(install, config):
    from benchmarks.memory_peak import MIB, estimated

    runtime_mib, peak_mib = MEASURED[install][config]
    # The estimate with the runtime measured in the same process as the peak.
    entry = estimated(config, runtime_mib * MIB, {"peak": peak_mib})
    assert 1.0 <= entry["estimate/peak"] <= 1.3


def test_a_job_beyond_the_hosts_memory_is_failed_precondition():
    from service.jobs.errors import FailedPrecondition

    host = 24 * 1024**3
    # The case: about 33 GB of weights over 16 logical CPU replicas.
    sixteen = _spec(650_000, 10, strategy="mirrored", devices=16)
    with pytest.raises(FailedPrecondition, match=r"16 replica\(s\).*75% of this host's 24.0 GiB"):
        validation.validate_job_spec(sixteen, data_dir=None, host_gpus=0, host_memory_bytes=host)
    demand, _ = validation.validate_job_spec(
        _spec(300_000, 10), data_dir=None, host_gpus=0, host_memory_bytes=host
    )
    assert demand.replicas == 1
    with pytest.raises(FailedPrecondition, match="a job may take"):
        validation.validate_job_spec(
            _spec(300_000, 10), data_dir=None, host_gpus=0, host_memory_bytes=4 * 1024**3
        )
    with pytest.raises(InvalidArgument, match="learning_rate must be at most"):
        validation.validate_job_spec(
            _lr(1e39),
            data_dir=None,
            host_gpus=0,
        )


def _lr(value: float):
    import dataclasses

    spec = _spec(64, 10)
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, learning_rate=value))


def test_a_replica_beyond_a_gpus_memory_is_failed_precondition():
    from service.jobs.errors import FailedPrecondition

    spec = _spec(300_000, 10, strategy="mirrored", devices=2)
    with pytest.raises(FailedPrecondition, match=r"per GPU.*90% of the 2.0 GiB a GPU"):
        validation.validate_job_spec(
            spec, data_dir=None, host_gpus=2, gpu_memory_bytes=2 * 1024**3, host_memory_bytes=0
        )
    validation.validate_job_spec(
        spec, data_dir=None, host_gpus=2, gpu_memory_bytes=16 * 1024**3, host_memory_bytes=0
    )


def test_model_tasks_past_the_bound_are_refused_at_once():
    import threading
    import time
    from pathlib import Path

    from service.jobs.errors import ResourceExhausted
    from service.jobs.model_tasks import ModelTasks
    from service.protocol import Predictions, PredictTask

    release = threading.Event()
    answered = []

    class BlockedWorker:
        def run(self, task, timeout):
            release.wait(30)
            return Predictions(probabilities=[[1.0]])

    tasks = ModelTasks(None, BlockedWorker(), data_dir=None, max_tasks=2)
    task = PredictTask(job_dir=Path("/nonexistent"), inputs=[[0.0]])
    running = [
        threading.Thread(target=lambda: answered.append(tasks._run_task(task, Predictions)))
        for _ in range(2)
    ]
    for thread in running:
        thread.start()
    deadline = time.monotonic() + 10
    while tasks._slots._value and time.monotonic() < deadline:  # both hold a slot
        time.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="2 Evaluate or Predict task"):
        tasks._run_task(task, Predictions)
    release.set()
    for thread in running:
        thread.join(10)
    assert len(answered) == 2
    assert isinstance(tasks._run_task(task, Predictions), Predictions)  # slots came back


def test_a_field_violation_cuts_a_huge_field_and_message():
    from google.rpc import error_details_pb2, status_pb2

    from service.api.status_codes import bad_request_status

    status = bad_request_status(InvalidArgument("m" * 1_000_000, field="labels[" + "k" * 10**6))
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert len(details) < 4096  # far under gRPC's 8 KiB default metadata limit
    decoded = status_pb2.Status.FromString(details)
    (violation,) = error_details_pb2.BadRequest.FromString(
        decoded.details[0].value
    ).field_violations
    assert len(violation.field) <= 303 and violation.field.startswith("labels[kkk")
    assert len(violation.description) <= 1003 and violation.description == status.details


@pytest.mark.parametrize(
    "labels",
    [{"k": "v" * 1_000_000}, {"k" * 1_000_000: "v"}, {"\u043a" * 10_000: "\u00e9" * 10_000}],
)
def test_a_label_echoed_in_an_error_is_cut(labels):
    with pytest.raises(InvalidArgument) as refused:
        convert.labels_from_proto(labels)
    assert len(refused.value.message) < 500 and len(refused.value.field) < 150


def test_a_reason_reaches_clients_as_one_line():
    from service.protocol import JobState, StateChange

    reason = "worker died (exit -9)\nTraceback (most recent call last):\n  File 'x'\n\tOSError"
    change = convert.state_change_to_proto(StateChange(state=JobState.FAILED, reason=reason), 0.0)
    assert (
        change.reason == "worker died (exit -9) Traceback (most recent call last): File 'x' OSError"
    )
    assert convert.reason_line("  already one line ") == "already one line"
