"""gRPC server metrics: RPCs started and handled, by method and code, and latency.

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


class MetricsServerInterceptor(WrappingInterceptor):
    """Counts and times every RPC into `registry`.

    Series: ntrain_grpc_server_started_total{grpc_method, grpc_type},
    ntrain_grpc_server_handled_total{grpc_method, grpc_code} and
    ntrain_grpc_server_handling_seconds{grpc_method} (a histogram; for a
    stream, the time until the stream ends).
    """

    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self.started = Counter(
            "ntrain_grpc_server_started",
            "RPCs started on the server.",
            ("grpc_method", "grpc_type"),
            registry=registry,
        )
        self.handled = Counter(
            "ntrain_grpc_server_handled",
            "RPCs completed on the server, by status code.",
            ("grpc_method", "grpc_code"),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "ntrain_grpc_server_handling_seconds",
            "Time to handle an RPC (for a stream, until it ends).",
            ("grpc_method",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        # "/ntrain.v1.TrainingService/SubmitJob" -> "ntrain.v1.TrainingService/SubmitJob"
        method = full_method.lstrip("/")
        if handler.unary_unary is not None:
            behaviour = self._unary(handler.unary_unary, method, "unary")
            make = grpc.unary_unary_rpc_method_handler
        elif handler.unary_stream is not None:
            behaviour = self._stream(handler.unary_stream, method, "server_stream")
            make = grpc.unary_stream_rpc_method_handler
        elif handler.stream_unary is not None:
            behaviour = self._unary(handler.stream_unary, method, "client_stream")
            make = grpc.stream_unary_rpc_method_handler
        else:  # server reflection is the one bidirectional stream here
            behaviour = self._stream(handler.stream_stream, method, "bidi_stream")
            make = grpc.stream_stream_rpc_method_handler
        return make(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _finish(self, method: str, context: grpc.ServicerContext, start: float, error) -> None:
        code = context.code()  # type: ignore[attr-defined]  # grpcio >= 1.38; stubs lag
        if code is None and (isinstance(error, GeneratorExit) or not context.is_active()):
            # The client went away before the call ended. gRPC either closes
            # the response generator (GeneratorExit) or, when the servicer ends
            # the stream itself on the cancellation (the health Watch does, from
            # its close callback), lets it finish normally; only the context
            # knows it was cancelled.
            code = grpc.StatusCode.CANCELLED
        elif code is None:
            code = grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK
        self.handled.labels(method, code.name).inc()
        self.handling_seconds.labels(method).observe(time.perf_counter() - start)

    def _unary(self, behaviour, method: str, kind: str):
        """Wraps a behaviour that returns one response (its request may be a stream)."""

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            self.started.labels(method, kind).inc()
            start, error = time.perf_counter(), None
            try:
                return behaviour(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._finish(method, context, start, error)

        return wrapped

    def _stream(self, behaviour, method: str, kind: str):
        """Wraps a behaviour that returns a stream of responses; counted when it ends."""

        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self.started.labels(method, kind).inc()
            start, error = time.perf_counter(), None
            try:
                yield from behaviour(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._finish(method, context, start, error)

        return wrapped
