"""Domain errors of the service and the one place that maps them to gRPC codes.

The job manager, the validation code and the store raise these; the
`ExceptionToStatusInterceptor` turns them into a status with the error's
message. Anything else that escapes a handler is a bug: it is logged with its
traceback and the client gets INTERNAL with a one-line message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request the service refuses, with the status code to answer it with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class WorkerError(ServiceError):
    """A worker process failed while answering a request (Evaluate, Predict)."""

    code = grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, ServiceError):
        context.abort(error.code, error.message)
    if context.code() not in (None, grpc.StatusCode.OK):
        raise error  # the handler already aborted with its own status (health, reflection)
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {error}")


class ExceptionToStatusInterceptor(grpc.ServerInterceptor):
    """Answer every `ServiceError` with its status code and message."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs in this service


def _wrap_unary(behaviour: Callable[[Any, grpc.ServicerContext], Any], method: str):
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behaviour(request, context)
        except Exception as error:  # noqa: BLE001 - the one place errors become statuses
            _abort(context, error, method)

    return wrapped


def _wrap_stream(behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str):
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behaviour(request, context)
        except Exception as error:  # noqa: BLE001 - the one place errors become statuses
            _abort(context, error, method)

    return wrapped
