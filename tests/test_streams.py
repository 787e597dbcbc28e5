"""Open WatchJob streams cannot starve the unary RPCs, and their number is bounded."""

from __future__ import annotations

import statistics
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc
from service_harness import RunningServer, job_spec

pytestmark = pytest.mark.slow


def _open_streams(address: str, job_id: str, count: int, per_channel: int = 100):
    """`count` WatchJob streams on the job, open (the calls start) but not read."""
    channels = [grpc.insecure_channel(address) for _ in range(-(-count // per_channel))]
    calls = []
    for index in range(count):
        stub = training_pb2_grpc.TrainingServiceStub(channels[index // per_channel])
        calls.append(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=120))
    return channels, calls


def _latencies(call, count: int) -> list[float]:
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def test_500_open_streams_leave_unary_calls_answering(tmp_path):
    server = RunningServer(tmp_path, warm_worker=False, max_cpu_jobs=1)
    try:
        running = server.submit(job_spec(epochs=100_000))
        waiting = server.submit(job_spec(epochs=1, seed=9))  # queued behind it
        server.wait_for(running.job_id, [pb.JOB_STATE_RUNNING])
        address = f"127.0.0.1:{server.server.port}"
        channels, calls = _open_streams(address, waiting.job_id, 500)
        # Each stream has its first event (the QUEUED change) once the server holds it.
        for call in calls[::50]:
            assert next(call).state_change.state == pb.JOB_STATE_QUEUED

        health = health_pb2_grpc.HealthStub(server.channel)
        check = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # noqa: E731
        get = lambda: server.stub.GetJob(pb.GetJobRequest(job_id=running.job_id), timeout=10)  # noqa: E731
        health_seconds = _latencies(check, 200)
        get_seconds = _latencies(get, 200)
        for name, seconds in (("Health.Check", health_seconds), ("GetJob", get_seconds)):
            p99 = statistics.quantiles(seconds, n=100)[98]
            print(f"\n{name} with 500 open streams: p50 {statistics.median(seconds) * 1e3:.1f} ms, "
                  f"p99 {p99 * 1e3:.1f} ms")  # fmt: skip
            # Starved, these timed out (8 s) behind 64 streams; the 50 ms p99
            # target is measured in benchmarks/load.py, not timed here.
            assert p99 < 1.0
        server.stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id), timeout=60)
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
    finally:
        server.stop()


def test_streams_past_the_limit_are_refused(tmp_path):
    server = RunningServer(tmp_path, warm_worker=False, max_streams=3, max_cpu_jobs=1)
    try:
        running = server.submit(job_spec(epochs=100_000))
        waiting = server.submit(job_spec(epochs=1, seed=9))
        server.wait_for(running.job_id, [pb.JOB_STATE_RUNNING])
        channels, calls = _open_streams(f"127.0.0.1:{server.server.port}", waiting.job_id, 3)
        for call in calls:
            next(call)
        extra = server.stub.WatchJob(pb.WatchJobRequest(job_id=waiting.job_id), timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            next(extra)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details().startswith("WatchJob: 3 streams are open")
        # Following a log holds a stream as long as a watch does: it counts too.
        logs = server.stub.GetJobLogs(
            pb.GetJobLogsRequest(job_id=running.job_id, follow=True), timeout=30
        )
        with pytest.raises(grpc.RpcError) as refused:
            next(logs)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details().startswith("GetJobLogs: 3 streams are open")
        calls[0].cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the freed place is taken again
            again = server.stub.WatchJob(pb.WatchJobRequest(job_id=waiting.job_id), timeout=30)
            try:
                next(again)
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(0.1)
        else:
            raise AssertionError("a cancelled stream's place was not freed")
        server.stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id), timeout=60)
        for channel in channels:
            channel.close()
    finally:
        server.stop()


def test_cancelled_log_follows_give_back_every_place(tmp_path):
    """Clients that follow a log and go away mid-stream, again and again, leak no place."""
    server = RunningServer(tmp_path, warm_worker=False, max_streams=2, max_cpu_jobs=1)
    try:
        running = server.submit(job_spec(epochs=100_000))
        queued = server.submit(job_spec(epochs=1, seed=9))  # waits behind it: never ends here
        server.wait_for(running.job_id, [pb.JOB_STATE_RUNNING])
        request = pb.GetJobLogsRequest(job_id=queued.job_id, follow=True)
        for _ in range(3):  # each round takes both places, then gives them back
            deadline = time.monotonic() + 10
            calls = []
            while len(calls) < 2:
                assert time.monotonic() < deadline, "cancelled follows did not free their places"
                call = server.stub.GetJobLogs(request, timeout=30)
                time.sleep(0.3)  # a refusal comes at once; an open follow sends nothing yet
                if call.done():
                    assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    continue
                calls.append(call)
            refused = server.stub.GetJobLogs(request, timeout=30)
            with pytest.raises(grpc.RpcError) as error:
                next(refused)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in calls:
                call.cancel()
        server.stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id), timeout=60)
    finally:
        server.stop()
