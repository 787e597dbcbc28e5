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

from service.jobs import errors

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARACTERS = 1000

STATUS_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
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


def one_line(message: str) -> str:
    """A status message as the client gets it: one line, of bounded length.

    Messages show client values cut short already (`naive_model.config.shown`);
    this is the net under them, so that no answer exceeds gRPC's metadata limit.
    """
    text = " ".join(message.split())
    return text if len(text) <= MAX_MESSAGE_CHARACTERS else text[:MAX_MESSAGE_CHARACTERS] + "..."


def _abort(context: grpc.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, errors.ServiceError):
        context.abort(status_code(error), one_line(error.message))
    # ServicerContext.code() exists since grpcio 1.38; the type stubs lag behind.
    if context.code() not in (None, grpc.StatusCode.OK):  # type: ignore[attr-defined]
        raise error  # the handler already aborted with its own status (health, reflection)
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, one_line(f"internal error in {method}: {error}"))


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
