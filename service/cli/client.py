"""The client side of the ntrain service: channel, errors, a reconnecting watch, requests.

What every client needs, whatever prints the answers: the command line is
built on it, and so are the demo and the benchmarks. No TensorFlow here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from ntrain.v1 import training_pb2, training_pb2_grpc

from naive_model.config import TrainConfig

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_ENV = "NTRAIN_ADDRESS"
TLS_CA_ENV = "NTRAIN_TLS_CA"
TLS_CERT_ENV = "NTRAIN_TLS_CERT"
TLS_KEY_ENV = "NTRAIN_TLS_KEY"
TOKEN_ENV = "NTRAIN_TOKEN"
TOKEN_FILE_ENV = "NTRAIN_TOKEN_FILE"
TERMINAL_STATES = frozenset({training_pb2.SUCCEEDED, training_pb2.FAILED, training_pb2.CANCELED})
# Predict sends inputs in chunks that stay well under gRPC's 4 MiB message limit.
PREDICT_CHUNK = 500
# Seconds for quick requests, and for Evaluate/Predict, which run a worker process.
QUICK_TIMEOUT = 30.0
MODEL_TIMEOUT = 300.0
# How long `watch` keeps trying to reconnect after the stream drops.
RECONNECT_SECONDS = 60.0


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
                f"pass --tls-ca or set ${TLS_CA_ENV})"
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


class CredentialsError(Exception):
    """A TLS or token file the client cannot use; the message is one line."""


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """How a client proves who it is: TLS material (PEM bytes) and a bearer token.

    tls_ca: the CA that signed the server's certificate; TLS is on when it (or
    a client certificate) is given. tls_cert, tls_key: a client certificate,
    for a server that asks for one. token: sent as `authorization: Bearer`.
    """

    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    token: str | None = None

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CredentialsError(f"cannot read the {what} {path}: {error.strerror}") from None


def load_credentials(
    *,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    token_file: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Credentials:
    """Credentials from files, each falling back to its environment variable.

    The token comes from `token_file`, else $NTRAIN_TOKEN (the token itself),
    else $NTRAIN_TOKEN_FILE.

    Raises:
        CredentialsError: a file cannot be read, is empty, or a client
            certificate comes without its key.
    """
    tls_ca = tls_ca or environ.get(TLS_CA_ENV) or None
    tls_cert = tls_cert or environ.get(TLS_CERT_ENV) or None
    tls_key = tls_key or environ.get(TLS_KEY_ENV) or None
    if (tls_cert is None) != (tls_key is None):
        raise CredentialsError("a client certificate needs both --tls-cert and --tls-key")
    token: str | None = None
    if token_file:
        token = _read(token_file, "token file").decode().strip()
    elif environ.get(TOKEN_ENV):
        token = environ[TOKEN_ENV].strip()
    elif environ.get(TOKEN_FILE_ENV):
        token = _read(environ[TOKEN_FILE_ENV], "token file").decode().strip()
    if token is not None and not token:
        raise CredentialsError("the token is empty")
    return Credentials(
        tls_ca=_read(tls_ca, "CA certificate") if tls_ca else None,
        tls_cert=_read(tls_cert, "client certificate") if tls_cert else None,
        tls_key=_read(tls_key, "client key") if tls_key else None,
        token=token,
    )


def is_loopback_address(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def open_channel(address: str, credentials: Credentials | None = None) -> grpc.Channel:
    """A channel to `address`: TLS when the credentials say so, with their token.

    Loopback addresses never go through a proxy: gRPC honours $https_proxy
    and $http_proxy, and without a matching $no_proxy it would send even
    127.0.0.1 through the proxy.

    Raises:
        CredentialsError: a token would cross the network in plaintext (no TLS
            to an address other than loopback).
    """
    credentials = credentials or Credentials()
    loopback = is_loopback_address(address)
    options = [("grpc.enable_http_proxy", 0)] if loopback else []
    if credentials.tls:
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=credentials.tls_ca,
            private_key=credentials.tls_key,
            certificate_chain=credentials.tls_cert,
        )
        if credentials.token is not None:
            channel_credentials = grpc.composite_channel_credentials(
                channel_credentials, grpc.access_token_call_credentials(credentials.token)
            )
        return grpc.secure_channel(address, channel_credentials, options=options)
    channel = grpc.insecure_channel(address, options=options)
    if credentials.token is None:
        return channel
    if not loopback:
        raise CredentialsError(
            f"refusing to send a token in plaintext to {address}: pass --tls-ca "
            f"(or set ${TLS_CA_ENV}) for a server that serves TLS"
        )
    # gRPC sends call credentials over TLS only; on loopback the token goes as
    # plain metadata, which never leaves the host.
    return grpc.intercept_channel(channel, _BearerToken(credentials.token))


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of an insecure loopback channel."""

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(  # type: ignore[return-value]  # gRPC takes any such tuple
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


def watch_events(
    stub: training_pb2_grpc.TrainingServiceStub,
    job_id: str,
    *,
    after_sequence: int = 0,
    reconnect_seconds: float = RECONNECT_SECONDS,
    on_reconnect: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[training_pb2.JobEvent]:
    """Every event of a job after `after_sequence`, once each, until the job ends.

    When the stream drops (the server restarted, the network hiccuped) it
    reconnects from the last sequence number seen, so nothing is missed or
    repeated, and gives up after `reconnect_seconds` without a connection.
    """
    last = after_sequence
    failing_since: float | None = None
    delay = 0.1
    while True:
        try:
            request = training_pb2.WatchJobRequest(job_id=job_id, after_sequence=last)
            for event in stub.WatchJob(request):
                failing_since, delay = None, 0.1
                if event.sequence <= last:
                    continue  # never show an event twice, whatever the server sends
                last = event.sequence
                yield event
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            now = clock()
            if failing_since is None:
                failing_since = now
                if on_reconnect is not None:
                    on_reconnect(last)
            elif now - failing_since > reconnect_seconds:
                raise
            sleep(delay)  # back off between attempts; gRPC offers no event to wait for here
            delay = min(delay * 2, 2.0)


def predict(
    stub: training_pb2_grpc.TrainingServiceStub,
    job_id: str,
    inputs: Sequence[Sequence[float]],
    *,
    timeout: float,
) -> list[training_pb2.Prediction]:
    """Predictions for every input, sent in chunks that fit a gRPC message."""
    predictions: list[training_pb2.Prediction] = []
    for start in range(0, len(inputs), PREDICT_CHUNK):
        request = training_pb2.PredictRequest(
            job_id=job_id,
            inputs=[
                training_pb2.Example(values=row) for row in inputs[start : start + PREDICT_CHUNK]
            ],
        )
        predictions.extend(stub.Predict(request, timeout=timeout).predictions)
    return predictions


def book_job_spec(overrides: training_pb2.JobSpec | None = None) -> training_pb2.JobSpec:
    """The book's network and its training as a JobSpec: `TrainConfig`'s defaults.

    784 -> 512 relu -> 10 softmax, Glorot, RMSprop 1e-3, batch 128, on MNIST;
    the fields set in `overrides` replace these (merged as protobuf merges).
    """
    defaults = TrainConfig()
    spec = training_pb2.JobSpec(
        layers=[
            training_pb2.LayerSpec(units=layer.units, activation=layer.activation)
            for layer in defaults.layers
        ],
        initializer=defaults.initializer,
        optimizer=training_pb2.OptimizerSpec(
            name=defaults.optimizer, learning_rate=defaults.learning_rate
        ),
        batch_size=defaults.batch_size,
        epochs=defaults.epochs,
        dataset="mnist",
        strategy=training_pb2.StrategySpec(name="auto"),
        seed=defaults.seed,
    )
    if overrides is not None:
        if overrides.layers:
            del spec.layers[:]  # merging would append to the book's layers
        spec.MergeFrom(overrides)
    return spec
