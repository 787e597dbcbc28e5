"""The client side of the ntrain service: channel, errors, a reconnecting watch, requests.

What every client needs, whatever prints the answers: the command line is
built on it, and so are the demo and the benchmarks. No TensorFlow here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import grpc
from ntrain.v1 import training_pb2, training_pb2_grpc

from naive_model.config import TrainConfig

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_ENV = "NTRAIN_ADDRESS"
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


def open_channel(address: str) -> grpc.Channel:
    """An insecure channel to `address`; loopback addresses never go through a proxy.

    gRPC honours $https_proxy and $http_proxy, and without a matching
    $no_proxy it would send even 127.0.0.1 through the proxy.
    """
    host = address.rsplit(":", 1)[0].strip("[]")
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    options = [("grpc.enable_http_proxy", 0)] if loopback else []
    return grpc.insecure_channel(address, options=options)


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
