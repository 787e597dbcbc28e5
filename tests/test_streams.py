"""Open WatchJob streams cannot starve the unary RPCs, and their number is bounded."""

from __future__ import annotations

import itertools
import statistics
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc
from service_harness import RunningServer, job_spec

from ntrain.client.watch import renewed, watch_events
from service.api.auth import new_token, token_hash
from service.jobs.access import Principal

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


def _token_file(path, *principals: tuple[str, str]) -> dict[str, str]:
    tokens = {name: new_token() for name, _ in principals}
    path.write_text("".join(f"{n} {role} {token_hash(tokens[n])}\n" for n, role in principals))
    return tokens


def test_one_viewer_cannot_take_the_owners_stream_slots(tmp_path):
    tokens = _token_file(tmp_path / "tokens", ("alice", "trainer"), ("eve", "viewer"))
    server = RunningServer(
        tmp_path / "state", warm_worker=False, max_cpu_jobs=1, auth_tokens=tmp_path / "tokens",
        max_streams=4, max_streams_per_principal=2,
    )  # fmt: skip
    as_alice = [("authorization", f"Bearer {tokens['alice']}")]
    as_eve = [("authorization", f"Bearer {tokens['eve']}")]
    try:
        job = server.stub.SubmitJob(
            pb.SubmitJobRequest(spec=job_spec(epochs=100_000)), metadata=as_alice, timeout=60
        )
        request = pb.WatchJobRequest(job_id=job.job_id)
        eves = [server.stub.WatchJob(request, metadata=as_eve, timeout=60) for _ in range(2)]
        for call in eves:
            next(call)
        extra = server.stub.WatchJob(request, metadata=as_eve, timeout=60)
        with pytest.raises(grpc.RpcError) as refused:
            next(extra)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == (
            "WatchJob: eve has 2 streams open (WatchJob, GetJobLogs and DownloadModel "
            "together), its limit of 2 per principal; close one or retry later"
        )
        # The owner follows its job and its log all the same.
        watch = server.stub.WatchJob(request, metadata=as_alice, timeout=60)
        assert next(watch).sequence >= 1
        logs = server.stub.GetJobLogs(
            pb.GetJobLogsRequest(job_id=job.job_id, follow=True), metadata=as_alice, timeout=60
        )
        assert server.server.streams.held(Principal(name="alice", role="trainer")) >= 1
        server.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=as_alice, timeout=60)
        for call in (*eves, watch, logs):
            call.cancel()
    finally:
        server.stop()


def test_a_watcher_that_stops_reading_is_dropped_and_gives_its_slot_back(tmp_path):
    server = RunningServer(
        tmp_path, warm_worker=False, max_cpu_jobs=1, stream_send_timeout_seconds=2.0
    )
    try:
        # A progress event a step, many a second: a window fills fast.
        running = server.submit(job_spec(epochs=100_000, batch_size=8, steps_per_execution=1))
        server.wait_for(running.job_id, [pb.JOB_STATE_RUNNING])
        # A client whose window stays small (no BDP probing grows it): gRPC stops
        # sending to it once 16 KiB wait unread.
        channel = grpc.insecure_channel(
            f"127.0.0.1:{server.server.port}",
            options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)],
        )
        stalled = training_pb2_grpc.TrainingServiceStub(channel).WatchJob(
            pb.WatchJobRequest(job_id=running.job_id), timeout=300
        )
        next(stalled)  # open, then never read again
        deadline = time.monotonic() + 120
        while len(server.server.streams) > 0:
            assert time.monotonic() < deadline, "the stalled watcher was not dropped in 120 s"
            time.sleep(0.2)
        # A reader that reads all along is not dropped, and the job runs on.
        events = server.stub.WatchJob(pb.WatchJobRequest(job_id=running.job_id), timeout=60)
        steps = [e.progress.step for e in itertools.islice(events, 200) if e.HasField("progress")]
        assert steps and len(server.server.streams) == 1
        assert (
            server.stub.GetJob(pb.GetJobRequest(job_id=running.job_id), timeout=10).state
            == pb.JOB_STATE_RUNNING
        )
        with pytest.raises(grpc.RpcError) as dropped:  # what the stalled one reads at last
            for _ in stalled:
                pass
        assert dropped.value.code() == grpc.StatusCode.CANCELLED
        events.cancel()
        channel.close()
        server.stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id), timeout=60)
    finally:
        server.stop()


def test_streams_end_at_their_age_and_readers_go_on_without_a_gap(tmp_path):
    """Under gRPC's default window a client that stops reading is dropped only by age."""
    server = RunningServer(tmp_path, warm_worker=False, max_cpu_jobs=1, stream_max_age_seconds=2.0)
    try:
        running = server.submit(job_spec(epochs=100_000, batch_size=8, steps_per_execution=1))
        server.wait_for(running.job_id, [pb.JOB_STATE_RUNNING])
        channel = grpc.insecure_channel(f"127.0.0.1:{server.server.port}")  # BDP probing on
        stalled = training_pb2_grpc.TrainingServiceStub(channel).WatchJob(
            pb.WatchJobRequest(job_id=running.job_id), timeout=300
        )
        next(stalled)  # open, then never read again
        reconnects, opened = [], []

        class CountingStub:
            def WatchJob(self, request):
                opened.append(request.after_sequence)
                return server.stub.WatchJob(request)

        reader = watch_events(CountingStub(), running.job_id, on_reconnect=reconnects.append)
        sequences, deadline = [], time.monotonic() + 8.0  # past at least two ages of 2-3 s
        for event in reader:
            sequences.append(event.sequence)
            if time.monotonic() > deadline:
                break
        reader.close()
        assert sequences == list(range(1, len(sequences) + 1))  # none missed or repeated
        assert len(opened) >= 3 and reconnects == []  # renewed twice or more, silently
        assert set(opened[1:]) <= set(sequences)  # each time from the last event given
        deadline = time.monotonic() + 30
        while len(server.server.streams) > 0:  # the stalled one went at its age
            assert time.monotonic() < deadline, "the stalled watcher was not dropped in 30 s"
            time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as ended:  # what the stalled one reads at last
            for _ in stalled:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert renewed(ended.value)
        channel.close()
        server.stub.CancelJob(pb.CancelJobRequest(job_id=running.job_id), timeout=60)
    finally:
        server.stop()
