"""The Python client of the ntrain training service; it imports no TensorFlow.

    from ntrain.client import Client, NotFound

    with Client("127.0.0.1:50051") as client:
        job = client.submit({"dataset": "mnist", "epochs": 2})
        finished = client.wait(job.job_id)
        probabilities = client.predict(job.job_id, images)   # (examples, classes)

Messages (`Job`, `JobSpec`, `Progress`, ...) are the contract's, from
`ntrain.v1.training_pb2`; errors are `NtrainError` subclasses named after
their gRPC status, each with a one-line message. The `ntrain` command line is
built on this package: it parses arguments and prints what the client returns.
"""

from ntrain.client.channel import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    DEFAULT_PORT,
    Credentials,
    is_loopback_address,
    load_credentials,
    normalize_address,
    open_channel,
)
from ntrain.client.client import (
    MODEL_TIMEOUT,
    QUICK_TIMEOUT,
    TERMINAL_STATES,
    Client,
    experiment_spec,
    job_spec,
    model_file_destination,
)
from ntrain.client.exceptions import (
    AddressError,
    AlreadyExists,
    Cancelled,
    CredentialsError,
    DeadlineExceeded,
    DownloadError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    NtrainError,
    PermissionDenied,
    ResourceExhausted,
    RpcFailed,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    describe_rpc_error,
)
from ntrain.client.states import STATE_NAMES, state_name, state_value
from ntrain.client.watch import JobEvent, watch_events

__all__ = [
    "ADDRESS_ENV",
    "DEFAULT_ADDRESS",
    "DEFAULT_PORT",
    "MODEL_TIMEOUT",
    "QUICK_TIMEOUT",
    "STATE_NAMES",
    "TERMINAL_STATES",
    "AddressError",
    "AlreadyExists",
    "Cancelled",
    "Client",
    "Credentials",
    "CredentialsError",
    "DeadlineExceeded",
    "DownloadError",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "JobEvent",
    "NotFound",
    "NtrainError",
    "PermissionDenied",
    "ResourceExhausted",
    "RpcFailed",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "describe_rpc_error",
    "is_loopback_address",
    "experiment_spec",
    "job_spec",
    "load_credentials",
    "model_file_destination",
    "normalize_address",
    "open_channel",
    "state_name",
    "state_value",
    "watch_events",
]
