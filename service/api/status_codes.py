"""The one place domain errors become gRPC status codes.

`service.jobs.errors` holds plain exceptions; this table gives each its code,
and `ExceptionToStatusInterceptor` answers every RPC that raised one with that
code and the error's message; an `InvalidArgument` that names its field also
carries a `google.rpc.BadRequest` with that field violation in the status
details (grpcio-status), for clients that read the standard rich error model.
A request whose bytes are no valid message gets
INVALID_ARGUMENT. Anything else that escapes a handler is a bug: it is logged
with its traceback and the client gets INTERNAL with one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.api.wrapping import WrappingInterceptor
from service.jobs import errors

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARACTERS = 1000
# A field violation's path; the checks cut the client's part of it (a label key) already.
MAX_FIELD_CHARACTERS = 300

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


def one_line(message: str) -> str:
    """A status message as the client gets it: one line, of bounded length.

    Messages show client values cut short already (`naive_model.config.shown`);
    this is the net under them, so that no answer exceeds gRPC's metadata limit.
    """
    text = " ".join(message.split())
    return text if len(text) <= MAX_MESSAGE_CHARACTERS else text[:MAX_MESSAGE_CHARACTERS] + "..."


def bad_request_status(error: errors.InvalidArgument) -> grpc.Status:
    """INVALID_ARGUMENT with the message, and the field violation in a BadRequest detail."""
    message = one_line(error.message)
    field = error.field
    if len(field) > MAX_FIELD_CHARACTERS:  # the net under the checks, as for the message
        field = field[:MAX_FIELD_CHARACTERS] + "..."
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    )


def _abort(context: grpc.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, errors.InvalidArgument) and error.field:
        context.abort_with_status(bad_request_status(error))
    if isinstance(error, errors.ServiceError):
        context.abort(status_code(error), one_line(error.message))
    # ServicerContext.code() exists since grpcio 1.38; the type stubs lag behind.
    if context.code() not in (None, grpc.StatusCode.OK):  # type: ignore[attr-defined]
        raise error  # the handler already aborted with its own status (health, reflection)
    log.exception("unexpected error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, one_line(f"internal error in {method}: {error}"))


class ExceptionToStatusInterceptor(WrappingInterceptor):
    """Answer every `ServiceError` with its status code and message."""

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:  # UploadDataset
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(_wrap_request_stream(handler.stream_unary), method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:  # reflection: refused with UNAUTHENTICATED too
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(_wrap_request_stream(handler.stream_stream), method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class _Undecodable:
    """A request whose bytes did not parse, handed on in place of the message."""

    def __init__(self, error: Exception, message_name: str):
        self.error = error
        self.message_name = message_name

    def abort(self, context: grpc.ServicerContext) -> None:
        # DecodeError says "Error parsing message with type 'T': why"; keep the why.
        reason = str(self.error).rsplit(": ", 1)[-1]
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            one_line(f"the request is not a valid {self.message_name} message ({reason})"),
        )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an `_Undecodable` where it would raise.

    gRPC calls the deserializer before any handler or interceptor behaviour
    runs; when it raises, gRPC logs the traceback and answers INTERNAL
    ("Exception deserializing request!"). Bytes that are no valid message are
    the client's mistake: the wrapped behaviours answer INVALID_ARGUMENT.
    """
    if deserializer is None:
        return None
    # Message.FromString is bound to its message class.
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    message_name = getattr(descriptor, "full_name", "request")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - DecodeError, or another parser's error
            return _Undecodable(error, message_name)

    return deserialize


def _wrap_unary(behaviour: Callable[[Any, grpc.ServicerContext], Any], method: str):
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            request.abort(context)
        try:
            return behaviour(request, context)
        except Exception as error:  # noqa: BLE001 - the one place errors become statuses
            _abort(context, error, method)

    return wrapped


def _wrap_stream(behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str):
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if isinstance(request, _Undecodable):
            request.abort(context)
        try:
            yield from behaviour(request, context)
        except Exception as error:  # noqa: BLE001 - the one place errors become statuses
            _abort(context, error, method)

    return wrapped


def _wrap_request_stream(
    behaviour: Callable[[Iterator[Any], grpc.ServicerContext], Any],
) -> Callable[[Iterator[Any], grpc.ServicerContext], Any]:
    """A handler of a request stream whose undecodable requests end the call."""

    def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            if isinstance(request, _Undecodable):
                request.abort(context)
            yield request

    def wrapped(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behaviour(checked(requests, context), context)

    return wrapped
