"""Evaluate and Predict on a real server's long-lived inference worker.

One server keeps one model loaded (`model_cache=1`) and takes one request at
a time (`max_model_tasks=1`), with two trained jobs: the second Predict on a
job loads nothing and starts no process, a second job evicts the first, a
killed worker is replaced (its task sent once more), the bound still refuses,
a re-exported model is not served stale, and the answers equal a fresh
in-process load's.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import struct
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from ntrain.v1 import training_pb2 as pb
from service_harness import RunningServer, child_worker_pids, inference_worker_pids, job_spec

from naive_model.data import synthetic_dataset, to_features
from ntrain.client import Client
from ntrain.client.tensors import tensor_array, tensor_message

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = RunningServer(
        tmp_path_factory.mktemp("state"), warm_worker=False, model_cache=1, max_model_tasks=1
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def jobs(server) -> tuple[str, str]:
    """Two jobs trained on the synthetic set from different seeds: two different models."""
    submitted = [server.submit(job_spec(seed=seed)) for seed in (1, 2)]
    for job in submitted:
        finished = server.wait_for(job.job_id)
        assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.failure_reason
    return submitted[0].job_id, submitted[1].job_id


@pytest.fixture(scope="module")
def test_split():
    dataset = synthetic_dataset()  # the split the jobs' "synthetic" data set holds
    return dataset.x_test, dataset.y_test


def predict(server: RunningServer, job_id: str, x: np.ndarray) -> np.ndarray:
    request = pb.PredictRequest(job_id=job_id, inputs=[pb.Example(values=row) for row in x])
    response = server.stub.Predict(request, timeout=120)
    return np.array([p.probabilities for p in response.predictions], dtype=np.float32)


def job_dir(server: RunningServer, job_id: str):
    return server.manager.store.job_dir(job_id)


def in_process(server: RunningServer, job_id: str, x: np.ndarray) -> np.ndarray:
    """What a fresh `tf.saved_model.load` of the export answers (as the one-shot worker did)."""
    from naive_model.export import predict_saved_model

    return predict_saved_model(job_dir(server, job_id) / "model", x)


def in_flight(server: RunningServer, call) -> tuple[threading.Thread, list]:
    """Start `call` on a thread once the worker is stopped; return when it holds the worker."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(call())
        except grpc.RpcError as error:
            outcome.append(error.code())

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.manager.models.worker._task_lock.locked():
        assert time.monotonic() < deadline, "the request never reached the inference worker"
        time.sleep(0.01)
    time.sleep(0.3)  # from taking the lock to sending the task: no waiting in between
    return thread, outcome


def test_a_second_predict_loads_nothing_and_starts_no_process(server, jobs, test_split):
    first_job, _ = jobs
    x = test_split[0][:8]
    first = predict(server, first_job, x)
    (pid,) = inference_worker_pids()
    worker = server.manager.models.worker
    started, loads = worker.started, server.manager.models.cache_state().loads

    second = predict(server, first_job, x)

    assert inference_worker_pids() == {pid} and worker.pid == pid and worker.started == started
    state = server.manager.models.cache_state()
    assert state.loads == loads and state.models == (job_dir(server, first_job),)
    assert state.model_bytes > 4 * 784 * 64  # the first layer's weights at least
    assert child_worker_pids() == set()  # no job or one-shot worker either
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "_pywrap_tensorflow" in maps and "cygrpc" not in maps  # a worker: no gRPC in it
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, in_process(server, first_job, x), rtol=1e-6, atol=1e-7)


def test_a_second_job_evicts_the_first_at_model_cache_1(server, jobs, test_split):
    first_job, second_job = jobs
    x, y = test_split
    predict(server, first_job, x[:4])
    loads = server.manager.models.cache_state().loads

    answer = predict(server, second_job, x[:4])
    state = server.manager.models.cache_state()
    assert state.models == (job_dir(server, second_job),) and state.loads == loads + 1
    np.testing.assert_allclose(answer, in_process(server, second_job, x[:4]), rtol=1e-6, atol=1e-7)

    predict(server, first_job, x[:4])
    state = server.manager.models.cache_state()
    assert state.models == (job_dir(server, first_job),) and state.loads == loads + 2

    evaluation = server.stub.Evaluate(pb.EvaluateRequest(job_id=first_job), timeout=120)
    assert server.manager.models.cache_state().loads == loads + 2  # answered from the cache
    probabilities = in_process(server, first_job, x)
    picked = np.clip(probabilities[np.arange(len(y)), y], 1e-7, 1.0)
    assert evaluation.examples == len(y) and evaluation.source == "model"
    assert evaluation.accuracy == pytest.approx(np.mean(probabilities.argmax(axis=1) == y))
    assert evaluation.loss == pytest.approx(-np.mean(np.log(picked)), rel=1e-5)


def test_past_the_bound_a_request_is_refused_at_once(server, jobs, test_split):
    first_job, _ = jobs
    x = test_split[0][:2]
    predict(server, first_job, x)
    (pid,) = inference_worker_pids()
    os.kill(pid, signal.SIGSTOP)  # the one admitted request then waits for its answer
    try:
        thread, outcome = in_flight(server, lambda: predict(server, first_job, x))
        with pytest.raises(grpc.RpcError) as refused:
            predict(server, first_job, x)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-model-tasks" in refused.value.details()
    finally:
        os.kill(pid, signal.SIGCONT)
    thread.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], np.ndarray)


def test_a_killed_inference_worker_is_replaced(server, jobs, test_split):
    first_job, _ = jobs
    x = test_split[0][:2]
    expected = predict(server, first_job, x)
    worker = server.manager.models.worker
    (pid,) = inference_worker_pids()

    os.kill(pid, signal.SIGKILL)  # while idle: the next request is answered by another
    np.testing.assert_array_equal(predict(server, first_job, x), expected)
    (replacement,) = inference_worker_pids()
    assert replacement != pid and worker.pid == replacement

    # Killed while answering, the task goes to a new worker; killed again, UNAVAILABLE.
    os.kill(replacement, signal.SIGSTOP)
    thread, outcome = in_flight(server, lambda: predict(server, first_job, x))
    os.kill(replacement, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while worker.pid in (None, replacement):  # the retry's process, importing TensorFlow
        assert time.monotonic() < deadline, "the task was not sent to a new worker"
        time.sleep(0.01)
    os.kill(worker.pid, signal.SIGKILL)
    thread.join(60)
    assert outcome == [grpc.StatusCode.UNAVAILABLE]

    np.testing.assert_array_equal(predict(server, first_job, x), expected)
    assert worker.pid is not None and inference_worker_pids() == {worker.pid}


def test_a_re_exported_model_is_not_served_stale(server, jobs, test_split):
    first_job, second_job = jobs
    x = test_split[0][:4]
    before = predict(server, first_job, x)
    loads = server.manager.models.cache_state().loads
    model = job_dir(server, first_job) / "model"
    # As the training loop exports: beside the old one, then renamed into place.
    staging = model.with_name(".model.tmp")
    shutil.copytree(job_dir(server, second_job) / "model", staging)
    shutil.rmtree(model)
    staging.rename(model)

    after = predict(server, first_job, x)

    assert server.manager.models.cache_state().loads == loads + 1
    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, in_process(server, second_job, x), rtol=1e-6, atol=1e-7)


def predict_tensor(server: RunningServer, job_id: str, x: np.ndarray) -> np.ndarray:
    request = pb.PredictRequest(job_id=job_id, tensor=tensor_message(x))
    response = server.stub.Predict(request, timeout=120)
    assert not response.predictions  # answered in the form asked
    return tensor_array(response.probabilities)


def test_a_tensor_answers_as_examples_do_and_uint8_is_scaled_as_for_training(server, jobs):
    first_job, _ = jobs
    pixels = np.random.default_rng(3).integers(0, 256, size=(5, 784), dtype=np.uint8)
    scaled = to_features(pixels)  # (5, 784) float32: what training makes of uint8 pixels

    from_uint8 = predict_tensor(server, first_job, pixels)

    assert from_uint8.shape == (5, 10) and from_uint8.dtype == np.float32
    np.testing.assert_array_equal(from_uint8, predict_tensor(server, first_job, scaled))
    np.testing.assert_array_equal(from_uint8, predict(server, first_job, scaled))
    np.testing.assert_allclose(
        from_uint8, in_process(server, first_job, scaled), rtol=1e-6, atol=1e-7
    )
    with Client(f"127.0.0.1:{server.server.port}") as client:
        np.testing.assert_array_equal(
            client.predict(first_job, pixels.reshape(5, 28, 28)), from_uint8
        )


def test_large_inputs_reach_the_worker_through_shared_memory_and_leave_no_file(server, jobs):
    first_job, _ = jobs
    rng = np.random.default_rng(4)
    floats = rng.random((512, 784), dtype=np.float32)  # 1.6 MB: past MIN_SHARED_BYTES
    pixels = rng.integers(0, 256, size=(1024, 784), dtype=np.uint8)  # 0.8 MB

    answers = [predict_tensor(server, first_job, x) for x in (floats, pixels, floats)]

    np.testing.assert_allclose(
        answers[0], in_process(server, first_job, floats), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_array_equal(answers[2], answers[0])
    np.testing.assert_allclose(
        answers[1], in_process(server, first_job, to_features(pixels)), rtol=1e-6, atol=1e-7
    )
    # The worker holds the server's file mapped, and its name is already gone.
    (pid,) = inference_worker_pids()
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    mapped = {line.split()[5] for line in maps if "/dev/shm/ntrain-inputs-" in line}
    assert mapped and not any(Path(path).exists() for path in mapped), maps


def bad_tensor(**fields) -> pb.Tensor:
    good = {"dtype": pb.DATA_TYPE_FLOAT32, "shape": [2, 784], "content": bytes(2 * 784 * 4)}
    return pb.Tensor(**{**good, **fields})


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"tensor": bad_tensor(dtype=pb.DATA_TYPE_UNSPECIFIED)}, "tensor.dtype"),
        ({"tensor": bad_tensor(dtype=7)}, "tensor.dtype"),
        ({"tensor": bad_tensor(content=bytes(2 * 784 * 4 - 1))}, "tensor.content"),
        ({"tensor": bad_tensor(shape=[2, 28, 28])}, "tensor.shape"),
        ({"tensor": bad_tensor(shape=[2 * 784])}, "tensor.shape"),
        ({"tensor": bad_tensor(shape=[4, 392])}, "tensor.shape"),
        (
            {"tensor": bad_tensor(content=struct.pack("<f", math.nan) + bytes(2 * 784 * 4 - 4))},
            "tensor.content",
        ),
        (
            {"tensor": bad_tensor(), "inputs": [pb.Example(values=[0.0] * 784)]},
            "inputs",
        ),
    ],
)
def test_a_bad_tensor_is_invalid_argument_with_a_field_violation(
    server, jobs, request_fields, field
):
    first_job, _ = jobs
    with pytest.raises(grpc.RpcError) as refused:
        server.stub.Predict(pb.PredictRequest(job_id=first_job, **request_fields), timeout=60)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(refused.value)
    (violation,) = error_details_pb2.BadRequest.FromString(status.details[0].value).field_violations
    assert violation.field == field and violation.description == refused.value.details()
