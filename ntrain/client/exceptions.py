"""What the client raises: one exception type per gRPC status code, each with a one-line message.

    try:
        client.get("job-nope")
    except ntrain.client.NotFound as error:
        print(error)            # not found: job 'job-nope' does not exist

Every exception is an `NtrainError`; those from the server carry the status
`code` and the server's `details`, and `str()` is a one-line message a person
can act on (the command line prints exactly that). An `InvalidArgument` also
lists the request's fields at fault in `field_violations`, from the status's
`google.rpc.BadRequest` detail:

    except ntrain.client.InvalidArgument as error:
        error.field_violations   # (FieldViolation(field='spec.batch_size', description=...),)
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """A field of the request the server refused: its path and why."""

    field: str  # e.g. "spec.optimizer.learning_rate", "spec.layers[1].units"
    description: str


class NtrainError(Exception):
    """Anything the ntrain client reports; `str()` is one line.

    Attributes:
        code: the gRPC status code, or None for an error raised before any call.
        details: the server's message (empty when there is none).
    """

    code: grpc.StatusCode | None = None

    def __init__(
        self,
        message: str,
        *,
        details: str = "",
        field_violations: tuple[FieldViolation, ...] = (),
    ):
        super().__init__(message)
        self.details = details
        self.field_violations = field_violations


class CredentialsError(NtrainError):
    """A TLS or token file the client cannot use, or a token that would go out in plaintext."""


class AddressError(NtrainError):
    """An address the client cannot use (it carries a scheme, or no host)."""


class DownloadError(NtrainError):
    """A model download the client refused to write (a path outside its folder, no model)."""


class RpcFailed(NtrainError):
    """The server answered a call with an error status; subclasses name the status."""

    code: grpc.StatusCode | None = grpc.StatusCode.UNKNOWN


class InvalidArgument(RpcFailed):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RpcFailed):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RpcFailed):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RpcFailed):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(RpcFailed):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(RpcFailed):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RpcFailed):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(RpcFailed):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RpcFailed):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(RpcFailed):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(RpcFailed):
    code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[RpcFailed]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
    )
    if cls.code is not None
}


def describe_rpc_error(error: grpc.RpcError, address: str, timeout: float | None = None) -> str:
    """A one-line, human message for a failed RPC."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = " ".join(str(error.details() or "").split()) if hasattr(error, "details") else ""
    status = grpc.StatusCode
    if code == status.UNAVAILABLE:
        if "handshake" in details.lower() or "ssl" in details.lower():
            return (
                f"the TLS handshake with {address} failed (is --tls-ca the CA that signed the "
                "server's certificate, and does the server want a client certificate?)"
            )
        if "socket closed" in details.lower():
            return (
                f"the server at {address} closed the connection (if it serves TLS, "
                "pass --tls-ca or set $NTRAIN_TLS_CA)"
            )
        if "connection refused" in details.lower():
            return f"the server is not reachable at {address} (connection refused)"
        if not details or "failed to connect" in details.lower():
            return f"the server is not reachable at {address}"
        return f"the server at {address} is unavailable: {details}"
    if code == status.DEADLINE_EXCEEDED:
        within = f" within {timeout:g} s" if timeout else ""
        return f"no answer from the server at {address}{within} (try a longer --timeout)"
    prefixes = {
        status.INVALID_ARGUMENT: "invalid request",
        status.NOT_FOUND: "not found",
        status.ALREADY_EXISTS: "already exists",
        status.FAILED_PRECONDITION: "not possible now",
        status.RESOURCE_EXHAUSTED: "the server is busy",
        status.PERMISSION_DENIED: "permission denied",
        status.UNAUTHENTICATED: "not authenticated",
        status.CANCELLED: "request cancelled",
        status.ABORTED: "aborted",
        status.OUT_OF_RANGE: "out of range",
    }
    if code == status.UNIMPLEMENTED:
        return f"the server at {address} does not offer this request (is it an ntrain server?)"
    if code in prefixes:
        return f"{prefixes[code]}: {details}" if details else prefixes[code]
    name = code.name if code is not None else "UNKNOWN"
    return f"server error ({name}): {details or 'no details'}"


def field_violations(error: grpc.RpcError) -> tuple[FieldViolation, ...]:
    """The BadRequest field violations in a failed call's status details, if any."""
    if not callable(getattr(error, "trailing_metadata", None)):
        return ()
    try:
        status = rpc_status.from_call(error)  # a failed call is also a grpc.Call
    except ValueError:  # details that disagree with the status: ignore them
        return ()
    found: list[FieldViolation] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend(
                FieldViolation(violation.field, violation.description)
                for violation in bad_request.field_violations
            )
    return tuple(found)


def from_rpc_error(error: grpc.RpcError, address: str, timeout: float | None = None) -> RpcFailed:
    """The typed exception for a failed call, its message from `describe_rpc_error`."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = str(error.details() or "") if callable(getattr(error, "details", None)) else ""
    cls = _BY_CODE.get(code, RpcFailed) if code is not None else RpcFailed
    failed = cls(
        describe_rpc_error(error, address, timeout),
        details=details,
        field_violations=field_violations(error),
    )
    if cls is RpcFailed:
        failed.code = code
    return failed
