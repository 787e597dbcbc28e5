"""Bad requests get the right status code, a message naming the field, and store nothing."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
from ntrain.v1 import training_pb2 as pb
from service_harness import RunningServer, job_spec, layers
from test_naive_data import write_npz_with_headers

from service.devices import fake_gpus

pytestmark = pytest.mark.slow

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory with a small 3-class set of 20 features and a non-data file."""
    directory = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    np.savez(
        directory / "small.npz",
        x_train=rng.random((64, 20), dtype=np.float32),
        y_train=rng.integers(0, 3, 64),
        x_test=rng.random((16, 20), dtype=np.float32),
        y_test=rng.integers(0, 3, 16),
    )
    (directory / "notes.txt").write_text("not a data set")
    x_test = rng.random((16, 20), dtype=np.float32)
    x_test[3, 4] = np.nan
    np.savez(
        directory / "nan.npz",
        x_train=rng.random((64, 20), dtype=np.float32),
        y_train=rng.integers(0, 3, 64),
        x_test=x_test,
        y_test=rng.integers(0, 3, 16),
    )
    shapes = {"x_train": (10**11, 784), "y_train": (10**11,), "x_test": (8, 784), "y_test": (8,)}
    write_npz_with_headers(directory / "huge.npz", shapes)
    outside = tmp_path_factory.mktemp("outside")
    np.savez(outside / "elsewhere.npz", x_train=np.zeros((4, 20)), y_train=np.zeros(4, int),
             x_test=np.zeros((4, 20)), y_test=np.zeros(4, int))  # fmt: skip
    (directory / "escape.npz").symlink_to(outside / "elsewhere.npz")
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    running = RunningServer(
        tmp_path_factory.mktemp("state"), data_dir=data_dir, warm_worker=False, max_queue=1
    )
    yield running
    running.stop()


def assert_refused(server, call, code, *words):
    """`call()` fails with `code` and a message holding `words`; the store is unchanged."""
    jobs_before, dirs_before = server.stored_job_count(), server.job_dirs()
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    assert error.code() == code, error.details()
    for word in words:
        assert word in error.details(), error.details()
    assert server.stored_job_count() == jobs_before
    assert server.job_dirs() == dirs_before
    return error.details()


BAD_SPECS = {
    "zero units": (
        {"layers": layers((0, "relu"), (10, "softmax"))},
        ("layers[0].units", "0"),
    ),
    "negative units": (
        {"layers": layers((64, "relu"), (-10, "softmax"))},
        ("layers[1].units", "-10"),
    ),
    "zero batch": ({"batch_size": 0}, ("batch_size", "0")),
    "negative batch": ({"batch_size": -128}, ("batch_size", "-128")),
    "batch over the data": ({"batch_size": 4096}, ("batch_size", "4096")),
    "zero epochs": ({"epochs": 0}, ("epochs", "0")),
    "negative epochs": ({"epochs": -1}, ("epochs", "-1")),
    "negative steps per execution": ({"steps_per_execution": -5}, ("steps_per_execution", "-5")),
    "NaN learning rate": (
        {"optimizer": pb.OptimizerSpec(name="sgd", learning_rate=math.nan)},
        ("learning_rate", "nan"),
    ),
    "negative learning rate": (
        {"optimizer": pb.OptimizerSpec(name="sgd", learning_rate=-0.1)},
        ("learning_rate", "-0.1"),
    ),
    "zero learning rate": (
        {"optimizer": pb.OptimizerSpec(name="sgd", learning_rate=0.0)},
        ("learning_rate", "0.0"),
    ),
    "bad momentum": (
        {"optimizer": pb.OptimizerSpec(name="momentum", learning_rate=0.1, momentum=1.5)},
        ("momentum", "1.5"),
    ),
    "unknown optimizer": (
        {"optimizer": pb.OptimizerSpec(name="adamw", learning_rate=1e-3)},
        ("optimizer", "adamw"),
    ),
    "unknown activation": (
        {"layers": layers((64, "gelu"), (10, "softmax"))},
        ("layers[0].activation", "gelu"),
    ),
    "unknown initializer": ({"initializer": "zeros"}, ("initializer", "zeros")),
    "last layer does not match the classes": (
        {"layers": layers((64, "relu"), (7, "softmax"))},
        ("layers[1].units", "10 classes", "7"),
    ),
    "last layer does not match a file's classes": (
        {"dataset": "small.npz"},
        ("layers[1].units", "3 classes", "10"),
    ),
    "batch not divisible by the replicas": (
        {"batch_size": 127, "strategy": pb.StrategySpec(name="mirrored", device_count=2)},
        ("batch_size", "replica count 2", "127"),
    ),
    "absurd model size": (
        {"layers": layers((1_000_000, "relu"), (1_000_000, "relu"), (10, "softmax"))},
        ("GiB", "1000000"),
    ),
    "dataset with a slash": ({"dataset": "sub/mnist.npz"}, ("dataset", "sub/mnist.npz")),
    "dataset with dot dot": ({"dataset": "..mnist"}, ("dataset", "..mnist")),
    "dataset escaping": ({"dataset": "../../etc/passwd"}, ("dataset", "../../etc/passwd")),
    "empty dataset": ({"dataset": ""}, ("dataset",)),
    "missing dataset file": ({"dataset": "absent.npz"}, ("dataset", "absent.npz")),
    "file that is not a data set": ({"dataset": "notes.txt"}, ("dataset", "notes.txt")),
    "header declaring a huge shape": (
        {"dataset": "huge.npz"},
        ("dataset", "huge.npz", "declares shape (100000000000, 784)"),
    ),
    "link out of the data directory": (
        {"dataset": "escape.npz"},
        ("dataset", "escape.npz", "outside the data directory"),
    ),
    "unknown strategy": ({"strategy": pb.StrategySpec(name="tpu")}, ("strategy.name", "tpu")),
    "multi_worker strategy without hosts": (
        {"strategy": pb.StrategySpec(name="multi_worker")},
        ("strategy.hosts", "multi_worker"),
    ),
    "hosts for a one-host strategy": (
        {"strategy": pb.StrategySpec(name="cpu", hosts=2)},
        ("strategy.hosts", "multi_worker only"),
    ),
    "negative device count": (
        {"strategy": pb.StrategySpec(name="mirrored", device_count=-2)},
        ("strategy.device_count", "-2"),
    ),
    "negative checkpoint interval": (
        {"checkpoint_every_epochs": -1},
        ("checkpoint_every_epochs", "-1"),
    ),
    "NaN run-time limit": ({"max_runtime_seconds": math.nan}, ("max_runtime_seconds", "nan")),
    "negative run-time limit": ({"max_runtime_seconds": -3.0}, ("max_runtime_seconds", "-3.0")),
    "negative seed": ({"seed": -1}, ("seed", "-1")),
    "unknown precision": ({"precision": "int8"}, ("precision", "int8")),
}


@pytest.mark.parametrize("case", BAD_SPECS, ids=list(BAD_SPECS))
def test_bad_spec_is_invalid_argument_and_stores_nothing(server, case):
    overrides, words = BAD_SPECS[case]
    spec = job_spec(**overrides)
    assert_refused(server, lambda: server.submit(spec, request_id=f"bad-{case}"), INVALID, *words)


def test_gpu_strategy_without_gpus_is_failed_precondition(server):
    spec = job_spec(strategy=pb.StrategySpec(name="gpu"))
    assert_refused(server, lambda: server.submit(spec), grpc.StatusCode.FAILED_PRECONDITION, "GPU")


def test_bad_request_id(server):
    assert_refused(server, lambda: server.submit(request_id="x" * 500), INVALID, "request_id")


@pytest.mark.parametrize("method", ["GetJob", "CancelJob", "Evaluate", "Predict", "WatchJob"])
def test_unknown_job_is_not_found(server, method):
    requests = {
        "GetJob": pb.GetJobRequest,
        "CancelJob": pb.CancelJobRequest,
        "Evaluate": pb.EvaluateRequest,
        "Predict": pb.PredictRequest,
        "WatchJob": pb.WatchJobRequest,
    }
    request = requests[method](job_id="job-000000000000")
    rpc = getattr(server.stub, method)
    call = (
        (lambda: list(rpc(request, timeout=10)))
        if method == "WatchJob"
        else (lambda: rpc(request, timeout=10))
    )
    assert_refused(server, call, grpc.StatusCode.NOT_FOUND, "job-000000000000")


def test_malformed_job_id_is_invalid(server):
    assert_refused(
        server,
        lambda: server.stub.GetJob(pb.GetJobRequest(job_id="../x"), timeout=10),
        INVALID,
        "job_id",
    )


def test_bad_list_and_watch_arguments(server):
    stub = server.stub
    assert_refused(
        server, lambda: stub.ListJobs(pb.ListJobsRequest(page_size=-1)), INVALID, "page_size", "-1"
    )
    assert_refused(
        server,
        lambda: stub.ListJobs(pb.ListJobsRequest(page_size=5000)),
        INVALID,
        "page_size",
        "5000",
    )
    assert_refused(
        server, lambda: stub.ListJobs(pb.ListJobsRequest(page_token="abc")), INVALID, "page_token"
    )
    assert_refused(
        server, lambda: stub.ListJobs(pb.ListJobsRequest(states=[42])), INVALID, "states"
    )


def test_a_refused_request_never_shows_unknown_or_internal(server):
    """A message with every field wrong still gets INVALID_ARGUMENT."""
    spec = pb.JobSpec(
        layers=layers((-1, "?")),
        optimizer=pb.OptimizerSpec(name="?", learning_rate=math.inf),
        batch_size=-1,
        epochs=-1,
        dataset="/",
        strategy=pb.StrategySpec(name="?", device_count=-1),
    )
    assert_refused(server, lambda: server.submit(spec), INVALID)


def test_queue_overflow_and_requests_before_a_model(server):
    """One CPU job runs, one waits (max_queue=1), the next is refused; no model yet."""
    long_job = job_spec(epochs=100_000)
    running = server.submit(long_job, request_id="runs")
    waiting = server.submit(long_job, request_id="waits")
    try:
        server.wait_for(running.job_id, [pb.JOB_STATE_RUNNING])
        assert (
            server.stub.GetJob(pb.GetJobRequest(job_id=waiting.job_id)).state == pb.JOB_STATE_QUEUED
        )
        assert_refused(
            server,
            lambda: server.submit(long_job, request_id="overflows"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "queue is full",
        )
        sequence_before = server.manager.get(waiting.job_id).last_sequence
        for job in (running, waiting):
            predict = pb.PredictRequest(job_id=job.job_id, inputs=[pb.Example(values=[0.0] * 784)])
            assert_refused(
                server,
                lambda request=predict: server.stub.Predict(request, timeout=30),
                grpc.StatusCode.FAILED_PRECONDITION,
                "no trained model",
            )
            evaluate = pb.EvaluateRequest(job_id=job.job_id)
            assert_refused(
                server,
                lambda request=evaluate: server.stub.Evaluate(request, timeout=30),
                grpc.StatusCode.FAILED_PRECONDITION,
                "no trained model",
            )
        assert server.manager.get(waiting.job_id).last_sequence == sequence_before
        bad_dataset = pb.EvaluateRequest(job_id=running.job_id, dataset="../x.npz")
        assert_refused(server, lambda: server.stub.Evaluate(bad_dataset), INVALID, "dataset")
        other_shape = pb.EvaluateRequest(job_id=running.job_id, dataset="small.npz")
        assert_refused(server, lambda: server.stub.Evaluate(other_shape), INVALID, "20 features")
        checkpoint = pb.EvaluateRequest(job_id=waiting.job_id, use_checkpoint=True)
        assert_refused(
            server,
            lambda: server.stub.Evaluate(checkpoint),
            grpc.StatusCode.FAILED_PRECONDITION,
            "no checkpoint",
        )
    finally:
        for job in (waiting, running):
            server.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=60)
    assert (
        server.stub.GetJob(pb.GetJobRequest(job_id=waiting.job_id)).state == pb.JOB_STATE_CANCELED
    )


def test_more_gpus_than_the_host_has_is_failed_precondition(tmp_path):
    server = RunningServer(tmp_path, warm_worker=False, gpu_inventory=fake_gpus(4))
    try:
        spec = job_spec(strategy=pb.StrategySpec(name="mirrored", device_count=5))
        assert_refused(
            server,
            lambda: server.submit(spec),
            grpc.StatusCode.FAILED_PRECONDITION,
            "5 GPUs, the host has 4",
        )
        info = server.stub.GetServerInfo(pb.GetServerInfoRequest())
        assert [d.name for d in info.devices if d.kind == "GPU"] == [f"GPU:{i}" for i in range(4)]
        assert "gpu" in info.strategies
    finally:
        server.stop()


def test_a_taken_port_fails_to_start_and_leaves_nothing_running(server, tmp_path):
    from service.api.server import ServerConfig, TrainingServer

    second = TrainingServer(
        ServerConfig(
            port=server.server.port, metrics_port=None, state_dir=tmp_path, gpu_inventory=()
        )
    )
    with pytest.raises(RuntimeError):
        second.start()
    assert second.manager is None or second.manager.pool.warm_ready == 0


def test_bytes_that_are_no_message_are_invalid_argument_without_a_traceback(server, caplog):
    """gRPC itself would answer INTERNAL and log a traceback per request."""
    garbage = b"\xff\xff\xff\x01 not a protobuf"
    for method in ("SubmitJob", "GetJob", "ListJobs", "Evaluate", "Predict", "GetServerInfo"):
        call = server.channel.unary_unary(f"/ntrain.v1.TrainingService/{method}")
        with pytest.raises(grpc.RpcError) as raised:
            call(garbage, timeout=10)
        assert raised.value.code() == INVALID, (method, raised.value.details())
        assert f"not a valid ntrain.v1.{method}Request message" in raised.value.details()
    for method in ("/ntrain.v1.TrainingService/WatchJob", "/grpc.health.v1.Health/Watch"):
        with pytest.raises(grpc.RpcError) as raised:
            list(server.channel.unary_stream(method)(garbage, timeout=10))
        assert raised.value.code() == INVALID, (method, raised.value.details())
    reflection = server.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(reflection(iter([garbage]), timeout=10))
    assert raised.value.code() == INVALID
    assert "Traceback" not in caplog.text and "Exception deserializing" not in caplog.text


def test_unicode_digits_and_huge_filters_in_list_jobs_are_invalid(server):
    stub = server.stub
    assert_refused(
        server,
        lambda: stub.ListJobs(pb.ListJobsRequest(page_token="\u00b2")),
        INVALID,
        "page_token",
    )
    assert_refused(
        server,
        lambda: stub.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_RUNNING] * 250_000)),
        INVALID,
        "at most 64 job states",
    )


def test_evaluate_on_unusable_data_is_failed_precondition_naming_it(server):
    """The worker loads the values; NaN among them is the data set's fault, not INTERNAL."""
    spec = job_spec(dataset="small.npz", layers=layers((8, "relu"), (3, "softmax")), batch_size=16)
    job = server.submit(spec, request_id="small-for-eval")
    assert server.wait_for(job.job_id).state == pb.JOB_STATE_SUCCEEDED
    assert_refused(
        server,
        lambda: server.stub.Evaluate(pb.EvaluateRequest(job_id=job.job_id, dataset="nan.npz")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "nan.npz: x_test holds non-finite values",
    )
    assert_refused(
        server,
        lambda: server.stub.Evaluate(pb.EvaluateRequest(job_id=job.job_id, dataset="huge.npz")),
        INVALID,
        "declares shape (100000000000, 784)",
    )
