"""The gRPC metrics interceptor on a real server on port 0."""

import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from service.errors import ExceptionToStatusInterceptor, NotFound
from service.grpc_metrics import MetricsServerInterceptor

CHECK = "grpc.health.v1.Health/Check"
WATCH = "grpc.health.v1.Health/Watch"


class MissingHealth(health.HealthServicer):
    """Check raises a domain error, to see the code the mapping interceptor gives it."""

    def Check(self, request, context):
        if request.service == "missing-domain":
            raise NotFound("no such service")
        return super().Check(request, context)


@pytest.fixture
def served():
    registry = CollectorRegistry()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[MetricsServerInterceptor(registry), ExceptionToStatusInterceptor()],
    )
    servicer = MissingHealth()
    servicer.set("ok", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield registry, health_pb2_grpc.HealthStub(channel), servicer
    finally:
        channel.close()
        server.stop(0).wait()


def test_unary_calls_are_counted_by_method_and_code(served):
    registry, stub, _ = served
    stub.Check(health_pb2.HealthCheckRequest(service="ok"), timeout=5)
    stub.Check(health_pb2.HealthCheckRequest(service="ok"), timeout=5)
    with pytest.raises(grpc.RpcError) as error:  # the servicer aborts with NOT_FOUND itself
        stub.Check(health_pb2.HealthCheckRequest(service="unknown"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:  # a domain error mapped by the interceptor
        stub.Check(health_pb2.HealthCheckRequest(service="missing-domain"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    value = registry.get_sample_value
    assert value("ntrain_grpc_server_started_total", {"grpc_method": CHECK,
                                                      "grpc_type": "unary"}) == 4  # fmt: skip
    assert value("ntrain_grpc_server_handled_total", {"grpc_method": CHECK,
                                                      "grpc_code": "OK"}) == 2  # fmt: skip
    assert value("ntrain_grpc_server_handled_total", {"grpc_method": CHECK,
                                                      "grpc_code": "NOT_FOUND"}) == 2  # fmt: skip
    assert value("ntrain_grpc_server_handling_seconds_count", {"grpc_method": CHECK}) == 4


def test_server_streams_are_counted_when_they_end(served):
    """A stream the client cancels counts as CANCELLED once the server sees it end."""
    registry, stub, servicer = served
    stream = stub.Watch(health_pb2.HealthCheckRequest(service="ok"), timeout=5)
    first = next(stream)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    value = registry.get_sample_value
    labels = {"grpc_method": WATCH, "grpc_type": "server_stream"}
    assert value("ntrain_grpc_server_started_total", labels) == 1
    stream.cancel()
    handled = {"grpc_method": WATCH, "grpc_code": "CANCELLED"}
    deadline = time.monotonic() + 10
    while value("ntrain_grpc_server_handled_total", handled) is None:
        assert time.monotonic() < deadline, "the server never finished the cancelled stream"
        servicer.set("ok", health_pb2.HealthCheckResponse.NOT_SERVING)  # wakes the stream
        time.sleep(0.05)
    assert value("ntrain_grpc_server_handled_total", handled) == 1
    assert value("ntrain_grpc_server_handling_seconds_count", {"grpc_method": WATCH}) == 1
