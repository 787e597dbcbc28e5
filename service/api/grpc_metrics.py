"""gRPC server metrics, named and labelled as the common gRPC Prometheus exporters do.

The families and labels of go-grpc-prometheus (and of its Python and Java
ports, py-grpc-prometheus and java-grpc-prometheus): RPCs started, handled by
status code, and their latency, each labelled with the service
("ntrain.v1.TrainingService"), the method ("SubmitJob") and the RPC type
("unary", "server_stream", ...). Their names are theirs too, without our
`ntrain_` prefix, so the dashboards and alert rules written for those
exporters read these series unchanged; the series are the server's all the
same, told apart by Prometheus's `job` label, as `process_*` and `python_*` are.

Unary and streaming methods alike; a stream is counted as handled when it ends.
The interceptor is placed outside the error-mapping interceptor, so it sees
the final status code of every call: a normal return (OK), a code set with
`context.set_code` or `context.abort`, or an exception gRPC turns into UNKNOWN.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.api.wrapping import WrappingInterceptor

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Every family carries these, in this order; `handled` adds grpc_code.
LABELS = ("grpc_type", "grpc_service", "grpc_method")
Labels = tuple[str, str, str]


def split_method(full_method: str) -> tuple[str, str]:
    """("ntrain.v1.TrainingService", "SubmitJob") from "/ntrain.v1.TrainingService/SubmitJob"."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def rpc_type(handler: grpc.RpcMethodHandler) -> str:
    """The exporters' grpc_type: unary, client_stream, server_stream or bidi_stream."""
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def rpc_labels(handler: grpc.RpcMethodHandler, full_method: str) -> Labels:
    """The LABELS values of one method."""
    service, method = split_method(full_method)
    return rpc_type(handler), service, method


class MetricsServerInterceptor(WrappingInterceptor):
    """Counts and times every RPC into `registry`.

    Series, each with grpc_type, grpc_service and grpc_method:
    grpc_server_started_total, grpc_server_handled_total (also grpc_code) and
    grpc_server_handling_seconds (a histogram; for a stream, the time until
    the stream ends).
    """

    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self.started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*LABELS, "grpc_code"),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC on the server (for a stream, until it ends).",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        labels = rpc_labels(handler, full_method)
        if handler.unary_unary is not None:
            behaviour = self._unary(handler.unary_unary, labels)
            make = grpc.unary_unary_rpc_method_handler
        elif handler.unary_stream is not None:
            behaviour = self._stream(handler.unary_stream, labels)
            make = grpc.unary_stream_rpc_method_handler
        elif handler.stream_unary is not None:
            behaviour = self._unary(handler.stream_unary, labels)
            make = grpc.stream_unary_rpc_method_handler
        else:  # server reflection is the one bidirectional stream here
            behaviour = self._stream(handler.stream_stream, labels)
            make = grpc.stream_stream_rpc_method_handler
        return make(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _finish(self, labels: Labels, context: grpc.ServicerContext, start: float, error) -> None:
        self.handled.labels(*labels, final_code(context, error).name).inc()
        self.handling_seconds.labels(*labels).observe(time.perf_counter() - start)

    def _unary(self, behaviour, labels: Labels):
        """Wraps a behaviour that returns one response (its request may be a stream)."""

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            self.started.labels(*labels).inc()
            start, error = time.perf_counter(), None
            try:
                return behaviour(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._finish(labels, context, start, error)

        return wrapped

    def _stream(self, behaviour, labels: Labels):
        """Wraps a behaviour that returns a stream of responses; counted when it ends."""

        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self.started.labels(*labels).inc()
            start, error = time.perf_counter(), None
            try:
                yield from behaviour(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._finish(labels, context, start, error)

        return wrapped


def final_code(context: grpc.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the client sees, once the behaviour returned or raised `error`."""
    code = context.code()  # type: ignore[attr-defined]  # grpcio >= 1.38; stubs lag
    if code is None and (isinstance(error, GeneratorExit) or not context.is_active()):
        # The client went away before the call ended. gRPC either closes
        # the response generator (GeneratorExit) or, when the servicer ends
        # the stream itself on the cancellation (the health Watch does, from
        # its close callback), lets it finish normally; only the context
        # knows it was cancelled.
        return grpc.StatusCode.CANCELLED
    if code is None:
        return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK
    return code
