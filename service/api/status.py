"""The one place domain errors become gRPC status codes.

`service.jobs.errors` holds plain exceptions; this table gives each its code,
and `ExceptionToStatusInterceptor` answers every RPC that raised one with that
code and the error's message. Anything else that escapes a handler is a bug:
it is logged with its traceback and the client gets INTERNAL with one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from service.api.wrapping import WrappingInterceptor
from service.jobs import errors

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.WorkerError: grpc.StatusCode.INTERNAL,
}


def status_code(error: errors.ServiceError) -> grpc.StatusCode:
    """The code for a domain error (its nearest listed base class)."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, errors.ServiceError):
        context.abort(status_code(error), error.message)
    # ServicerContext.code() exists since grpcio 1.38; the type stubs lag behind.
    if context.code() not in (None, grpc.StatusCode.OK):  # type: ignore[attr-defined]
        raise error  # the handler already aborted with its own status (health, reflection)
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {error}")


class ExceptionToStatusInterceptor(WrappingInterceptor):
    """Answer every `ServiceError` with its status code and message."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
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
        if handler.stream_stream is not None:  # reflection: refused with UNAUTHENTICATED too
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming RPCs here


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
