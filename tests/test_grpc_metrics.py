"""The gRPC metrics interceptor on a real server on port 0."""

import contextlib
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from service.api.grpc_metrics import LABELS, MetricsServerInterceptor, split_method
from service.api.status_codes import ExceptionToStatusInterceptor
from service.jobs.errors import NotFound

HEALTH = "grpc.health.v1.Health"
# The labels of every family but grpc_code, as go-grpc-prometheus sets them.
CHECK = {"grpc_type": "unary", "grpc_service": HEALTH, "grpc_method": "Check"}
WATCH = {"grpc_type": "server_stream", "grpc_service": HEALTH, "grpc_method": "Watch"}
REFLECTION = {
    "grpc_type": "bidi_stream",
    "grpc_service": "grpc.reflection.v1alpha.ServerReflection",
    "grpc_method": "ServerReflectionInfo",
}


class MissingHealth(health.HealthServicer):
    """Check ends in the ways a servicer can end a call, chosen by the service name."""

    def Check(self, request, context):
        if request.service == "missing-domain":  # mapped to NOT_FOUND by the interceptor
            raise NotFound("no such service")
        if request.service == "set-code":  # a code set without raising
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            return health_pb2.HealthCheckResponse()
        if request.service == "crash":  # a plain exception: gRPC answers UNKNOWN
            raise RuntimeError("servicer bug")
        return super().Check(request, context)


@contextlib.contextmanager
def _serve(map_errors: bool = True):
    registry = CollectorRegistry()
    interceptors = [MetricsServerInterceptor(registry)]
    if map_errors:
        interceptors.append(ExceptionToStatusInterceptor())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    servicer = MissingHealth()
    servicer.set("ok", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection((reflection.SERVICE_NAME,), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield registry, health_pb2_grpc.HealthStub(channel), servicer, channel
    finally:
        channel.close()
        server.stop(0).wait()


@pytest.fixture
def served():
    with _serve() as running:
        yield running


def test_unary_calls_are_counted_by_method_and_code(served):
    registry, stub, _, _ = served
    stub.Check(health_pb2.HealthCheckRequest(service="ok"), timeout=5)
    stub.Check(health_pb2.HealthCheckRequest(service="ok"), timeout=5)
    with pytest.raises(grpc.RpcError) as error:  # the servicer aborts with NOT_FOUND itself
        stub.Check(health_pb2.HealthCheckRequest(service="unknown"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:  # a domain error mapped by the interceptor
        stub.Check(health_pb2.HealthCheckRequest(service="missing-domain"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    value = registry.get_sample_value
    assert value("grpc_server_started_total", CHECK) == 4
    assert value("grpc_server_handled_total", {**CHECK, "grpc_code": "OK"}) == 2
    assert value("grpc_server_handled_total", {**CHECK, "grpc_code": "NOT_FOUND"}) == 2
    assert value("grpc_server_handling_seconds_count", CHECK) == 4


def test_server_streams_are_counted_when_they_end(served):
    """A stream the client cancels counts as CANCELLED once the server sees it end."""
    registry, stub, servicer, _ = served
    stream = stub.Watch(health_pb2.HealthCheckRequest(service="ok"), timeout=5)
    first = next(stream)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    value = registry.get_sample_value
    assert value("grpc_server_started_total", WATCH) == 1
    stream.cancel()
    handled = {**WATCH, "grpc_code": "CANCELLED"}
    deadline = time.monotonic() + 10
    while value("grpc_server_handled_total", handled) is None:
        assert time.monotonic() < deadline, "the server never finished the cancelled stream"
        servicer.set("ok", health_pb2.HealthCheckResponse.NOT_SERVING)  # wakes the stream
        time.sleep(0.05)
    assert value("grpc_server_handled_total", handled) == 1
    assert value("grpc_server_handling_seconds_count", WATCH) == 1


@pytest.mark.parametrize(
    ("map_errors", "service", "code"),
    [
        (True, "set-code", "FAILED_PRECONDITION"),  # set without raising
        (True, "crash", "INTERNAL"),  # the mapping interceptor's answer to a bug
        (False, "crash", "UNKNOWN"),  # gRPC's own answer, without the mapping
    ],
)
def test_the_recorded_code_is_the_one_the_client_sees(map_errors, service, code):
    with _serve(map_errors) as (registry, stub, _, _):
        with pytest.raises(grpc.RpcError) as error:
            stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert error.value.code().name == code
        labels = {**CHECK, "grpc_code": code}
        assert registry.get_sample_value("grpc_server_handled_total", labels) == 1


def test_bidirectional_streams_are_counted(served):
    """Server reflection (what grpcurl uses) is a bidirectional stream."""
    registry, _, _, channel = served
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answers = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert answers[0].list_services_response.service
    value = registry.get_sample_value
    assert value("grpc_server_started_total", REFLECTION) == 1
    assert value("grpc_server_handled_total", {**REFLECTION, "grpc_code": "OK"}) == 1


def test_every_family_has_the_exporters_labels(served):
    """grpc_type, grpc_service and grpc_method on every series, as dashboards for them expect."""
    registry, stub, _, _ = served
    stub.Check(health_pb2.HealthCheckRequest(service="ok"), timeout=5)
    families = [f for f in registry.collect() if f.name.startswith("grpc_server_")]
    assert {f.name for f in families} == {
        "grpc_server_started",
        "grpc_server_handled",
        "grpc_server_handling_seconds",
    }
    for family in families:
        assert family.samples, family.name
        for sample in family.samples:
            assert set(LABELS) <= set(sample.labels), (family.name, sample.labels)
            assert "/" not in sample.labels["grpc_service"] + sample.labels["grpc_method"]


def test_a_full_method_name_splits_into_service_and_method():
    assert split_method("/ntrain.v1.TrainingService/SubmitJob") == (
        "ntrain.v1.TrainingService",
        "SubmitJob",
    )
    assert split_method("/grpc.health.v1.Health/Check") == ("grpc.health.v1.Health", "Check")
