"""The service's domain errors: plain exceptions that name what was wrong.

The job manager, validation and the scheduler raise these; they know nothing
of gRPC. The API's `service.api.status_codes` maps each class to a status code in one
table, as kserve's `ExceptionToStatusInterceptor` does.
"""

from __future__ import annotations

import re


class ServiceError(Exception):
    """A request the service refuses; `message` is one line for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# A message that starts with a field's name: "layers[1].units must be ...".
_NAMED_FIELD = re.compile(
    r"([a-z_][a-z0-9_]*(?:\[\d+\])?(?:\.[a-z_][a-z0-9_]*(?:\[\d+\])?)*)"
    r" (?:must|holds|has) "
)


class InvalidArgument(ServiceError):
    """A field of the request is invalid; the message names it and its value.

    `field` is that field's path ("batch_size", "layers[1].units"): given, or
    read from the start of the message, where every check of this service
    names it ("" when the message does not start with one).
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        if not field:
            named = _NAMED_FIELD.match(message)
            field = named.group(1) if named else ""
        self.field = field


class NotFound(ServiceError):
    """The job (or data set) named does not exist."""


class AlreadyExists(ServiceError):
    """A request_id was used before for a different request."""


class Unauthenticated(ServiceError):
    """No credentials, or credentials the server does not accept (never echoed back)."""


class PermissionDenied(ServiceError):
    """The caller is known, but its role or the job's owner does not allow the request."""


class FailedPrecondition(ServiceError):
    """The request is valid but the job or host is not in a state to do it."""


class ResourceExhausted(ServiceError):
    """A bound was reached (the queue); retry later."""


class Unavailable(ServiceError):
    """The server is shutting down, or a worker process it needs ended: retry."""


class WorkerError(ServiceError):
    """A worker process failed while answering a request (Evaluate, Predict)."""


# A job's failure reason is one readable line of at most this many characters.
MAX_REASON_CHARACTERS = 300


def reason_line(error: BaseException | str) -> str:
    """An error as a job's failure reason: one line, its length bounded."""
    text = " ".join(str(error).split())
    if len(text) <= MAX_REASON_CHARACTERS:
        return text
    return text[:MAX_REASON_CHARACTERS] + "..."
