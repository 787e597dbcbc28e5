"""A job's events and log lines as Python iterators that reconnect without gaps."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from ntrain.v1 import training_pb2, training_pb2_grpc

# How long `watch` keeps trying to reconnect after the stream drops.
RECONNECT_SECONDS = 60.0

# The server ends a long watch or log follow at its age limit (`ntrain serve
# --stream-max-age`) with UNAVAILABLE and this trailing metadata: reconnect at
# once, where the stream ended, and tell no one.
RENEW_METADATA_KEY = "ntrain-stream-renew"


def renewed(error: grpc.RpcError) -> bool:
    """The server ended the stream for renewal, not because it is going away."""
    trailing = getattr(error, "trailing_metadata", None)
    metadata = trailing() if trailing is not None else None
    return any(key == RENEW_METADATA_KEY for key, _ in metadata or ())


class _Reconnection:
    """When a follow's stream ends UNAVAILABLE: at once after a renewal, else backing off.

    `lost()` returns once it is time to reconnect (telling `on_reconnect(where)`
    at the first failed attempt), and raises the error after `seconds` of
    failed attempts; `received()` resets it.
    """

    def __init__(
        self, seconds: float, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        self._seconds, self._clock, self._sleep = seconds, clock, sleep
        self._failing_since: float | None = None
        self._delay = 0.1

    def received(self) -> None:
        self._failing_since, self._delay = None, 0.1

    def lost(
        self,
        error: grpc.RpcError,
        on_reconnect: Callable[[int], None] | None = None,
        where: int = 0,
    ) -> None:
        if renewed(error):
            return
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
            if on_reconnect is not None:
                on_reconnect(where)
        elif now - self._failing_since > self._seconds:
            raise error
        self._sleep(self._delay)  # back off between attempts; gRPC offers no event to wait for
        self._delay = min(self._delay * 2, 2.0)


# What an event carries: exactly one of these messages of the contract.
EventPayload = (
    training_pb2.StateTransition
    | training_pb2.Progress
    | training_pb2.EpochSummary
    | training_pb2.JobResult
)


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """One event of a job: match on the type of `payload`.

    payload: a `StateTransition` (the job changed state, with the reason),
    `Progress` (after a compiled call), `EpochSummary` (an epoch ended, with
    its evaluation when due) or `JobResult` (the training's outcome).
    sequence: strictly increasing per job from 1, with no gaps; pass the last
    one seen as `after=` to go on from there.
    """

    job_id: str
    sequence: int
    time: datetime
    payload: EventPayload

    @classmethod
    def from_proto(cls, event: training_pb2.JobEvent) -> JobEvent:
        kind = event.WhichOneof("event")
        if kind is None:
            raise ValueError(f"event {event.sequence} of {event.job_id} carries nothing")
        return cls(
            job_id=event.job_id,
            sequence=event.sequence,
            time=event.time.ToDatetime(tzinfo=UTC),
            payload=getattr(event, kind),
        )


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
    reconnection = _Reconnection(reconnect_seconds, clock, sleep)
    while True:
        try:
            request = training_pb2.WatchJobRequest(job_id=job_id, after_sequence=last)
            for event in stub.WatchJob(request):
                reconnection.received()
                if event.sequence <= last:
                    continue  # never show an event twice, whatever the server sends
                last = event.sequence
                yield event
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            reconnection.lost(error, on_reconnect, last)


def follow_log(
    stub: training_pb2_grpc.TrainingServiceStub,
    job_id: str,
    *,
    offset: int = 0,
    follow: bool = False,
    timeout: float | None = None,
    reconnect_seconds: float = RECONNECT_SECONDS,
    on_reconnect: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[str]:
    """The job's log lines from byte `offset`; with `follow`, until the job ends.

    A followed log whose stream drops (a server that restarts ends it
    UNAVAILABLE) reconnects from the byte after the last whole chunk received
    (each chunk names it), so no line is lost or repeated; it gives up after
    `reconnect_seconds` without a connection, raising, never ending short.
    `on_reconnect(offset)` is told when it starts trying.
    """
    reconnection = _Reconnection(reconnect_seconds, clock, sleep)
    while True:
        try:
            request = training_pb2.GetJobLogsRequest(job_id=job_id, follow=follow, offset=offset)
            for chunk in stub.GetJobLogs(request, timeout=timeout):
                reconnection.received()
                offset = chunk.next_offset
                yield from chunk.lines
            return
        except grpc.RpcError as error:
            if not follow or error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            reconnection.lost(error, on_reconnect, offset)


def watch_experiment_states(
    stub: training_pb2_grpc.TrainingServiceStub,
    experiment_id: str,
    *,
    reconnect_seconds: float = RECONNECT_SECONDS,
    on_reconnect: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[training_pb2.Experiment]:
    """The experiment now, then each time it changes, until it has settled.

    Each message is the whole experiment, so a dropped stream (UNAVAILABLE)
    reconnects and goes on; the state it was left in, sent again first, is
    not given twice. It gives up after `reconnect_seconds` without a
    connection; `on_reconnect()` is told when it starts trying.
    """
    last: bytes | None = None
    reconnection = _Reconnection(reconnect_seconds, clock, sleep)
    told = None if on_reconnect is None else (lambda _: on_reconnect())
    while True:
        try:
            request = training_pb2.WatchExperimentRequest(experiment_id=experiment_id)
            for experiment in stub.WatchExperiment(request):
                reconnection.received()
                state = experiment.SerializeToString(deterministic=True)
                if state == last:
                    continue
                last = state
                yield experiment
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            reconnection.lost(error, told)
