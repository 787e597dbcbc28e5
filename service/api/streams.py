"""The server's streams (WatchJob, GetJobLogs, DownloadModel): fair slots, slow readers dropped.

Each open stream holds a thread and a slot. `StreamSlots` shares the server's
`total` slots fairly: one principal holds `per_principal` at most, so 256
streams of one viewer leave its owner's `ntrain watch` room. (Without a token
file every caller is `LOCAL`, the one principal there is: its limit is the total.)

A client that stops reading costs no CPU: gRPC's synchronous server blocks the
stream's thread in the send of the next message once HTTP/2 flow control has
filled the client's window, so the backlog of a stream is that window and one
message. `StreamSlots` also notes when each stream's message began to wait, and
its reaper cancels a stream whose message has waited `send_timeout` seconds
(the client sees CANCELLED; the log says whose stream and why), which frees
the thread and the slot.

That alone does not bound a stalled reader under gRPC's defaults: the client
library takes bytes for an application that reads nothing, and BDP probing
grows its window to megabytes, hours of a job's events. So a stream that can
be resumed (WatchJob, a followed GetJobLogs, WatchExperiment) also has an age
limit, as Kubernetes' API server gives each watch (`--min-request-timeout`):
past `max_age` seconds, and a random part of them more so that streams opened
together do not all come back at once, it ends UNAVAILABLE with the trailing
metadata `ntrain-stream-renew: 1`. The clients here reconnect at once from
where they were, without a word; a client that stopped reading has lost its
thread and slot by then, whatever its window.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from service.jobs.access import LOCAL, Principal
from service.jobs.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

SEND_TIMEOUT_SECONDS = 30.0  # a message a client has not taken for this long drops its stream
# A resumable stream ends after this, plus up to half of it again; reconnecting
# costs one indexed read of the events after the client's last one.
MAX_AGE_SECONDS = 600.0
MAX_AGE_SPREAD = 0.5
RENEW_METADATA = ("ntrain-stream-renew", "1")  # the client reconnects at once, silently
REAP_SECONDS = 1.0  # how often the reaper looks
_STREAMS = "WatchJob, GetJobLogs and DownloadModel together"

Message = TypeVar("Message")


class Cancellable(Protocol):
    """What the slots need of a call's context (grpc.ServicerContext has it)."""

    def cancel(self) -> object: ...

    def peer(self) -> str: ...

    def is_active(self) -> bool: ...

    def set_trailing_metadata(self, trailing_metadata: tuple[tuple[str, str], ...]) -> None: ...


@dataclass(eq=False)
class OpenStream:
    method: str
    principal: Principal
    context: Cancellable
    clock: Callable[[], float]
    ends_at: float | None = None  # a resumable stream's age limit, on `clock`
    waiting_since: float | None = field(default=None)  # a message is waiting to be taken

    def aged(self) -> bool:
        return self.ends_at is not None and self.clock() >= self.ends_at

    def is_active(self) -> bool:
        """The client is there, and the stream is within its age limit."""
        return not self.aged() and self.context.is_active()


class StreamSlots:
    """The server's stream slots, `per_principal` at most for each principal.

    Args:
        total: streams open at once (--max-streams).
        per_principal: streams one principal may hold (--max-streams-per-principal;
            at most `total`).
        send_timeout: seconds a message may wait for its client before the
            stream is cancelled (--stream-send-timeout).
        max_age: seconds a resumable stream stays open, plus up to
            `MAX_AGE_SPREAD` of them more (--stream-max-age; 0: no limit).
    """

    def __init__(
        self,
        total: int,
        per_principal: int,
        *,
        send_timeout: float = SEND_TIMEOUT_SECONDS,
        max_age: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        spread: Callable[[], float] = random.random,
    ):
        self.total = total
        self.per_principal = min(per_principal, total)
        self.send_timeout = send_timeout
        self.max_age = max_age
        self._clock = clock
        self._spread = spread
        self._lock = threading.Lock()
        self._open: set[OpenStream] = set()
        self._held: dict[str, int] = {}
        self._stopped = threading.Event()
        self._reaper: threading.Thread | None = None

    def limit(self, principal: Principal) -> int:
        return self.total if principal == LOCAL else self.per_principal

    def held(self, principal: Principal) -> int:
        with self._lock:
            return self._held.get(principal.name, 0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    @contextlib.contextmanager
    def slot(
        self, method: str, principal: Principal, context: Cancellable, *, resumable: bool = False
    ) -> Iterator[OpenStream]:
        """Hold a slot while the stream is open; a `resumable` one ages (`send`).

        Raises:
            ResourceExhausted: the principal holds its limit, or the server its total.
        """
        limit = self.limit(principal)
        with self._lock:
            held = self._held.get(principal.name, 0)
            if held >= limit and limit < self.total:
                raise ResourceExhausted(
                    f"{method}: {principal.name} has {held} streams open ({_STREAMS}), "
                    f"its limit of {limit} per principal; close one or retry later"
                )
            if len(self._open) >= self.total:
                raise ResourceExhausted(
                    f"{method}: {self.total} streams are open ({_STREAMS}), the server's "
                    "limit; retry later"
                )
            stream = OpenStream(method, principal, context, self._clock)
            if resumable and self.max_age > 0:
                lifetime = self.max_age * (1.0 + MAX_AGE_SPREAD * self._spread())
                stream.ends_at = self._clock() + lifetime
            self._open.add(stream)
            self._held[principal.name] = held + 1
        try:
            yield stream
        finally:
            with self._lock:
                self._open.discard(stream)
                self._held[principal.name] -= 1
                if not self._held[principal.name]:
                    del self._held[principal.name]

    def send(self, stream: OpenStream, messages: Iterable[Message]) -> Iterator[Message]:
        """`messages`, each noted as waiting from when it is handed to gRPC until it was taken.

        gRPC asks for the next message only once the previous one was sent,
        so the time between the two is the time the client kept it waiting.
        A stream past its age limit takes no more of `messages` (which should
        wait on `stream.is_active`) and ends UNAVAILABLE, marked for renewal.

        Raises:
            Unavailable: the stream reached its age limit; reconnect to go on.
        """
        iterator = iter(messages)
        try:
            for message in iterator:
                if stream.aged():  # the client resumes after what it was given
                    break
                stream.waiting_since = self._clock()
                yield message
                stream.waiting_since = None
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        if not stream.aged():
            return
        log.info(
            "ended a %s stream of %s from %s at its age limit; a client that reads reconnects",
            stream.method,
            stream.principal.name or "the local caller",
            stream.context.peer(),
        )
        stream.context.set_trailing_metadata((RENEW_METADATA,))
        raise Unavailable(
            f"this {stream.method} stream reached its age limit (--stream-max-age "
            f"{self.max_age:g} s and a random part more); reconnect to go on where it ended"
        )

    def drop_stalled(self) -> int:
        """Cancel the streams whose message has waited `send_timeout`; how many."""
        now = self._clock()
        with self._lock:
            stalled = [
                stream
                for stream in self._open
                if stream.waiting_since is not None
                and now - stream.waiting_since >= self.send_timeout
            ]
        for stream in stalled:
            stream.waiting_since = None  # cancelled once
            log.warning(
                "dropped a %s stream of %s from %s: it took no message for %.0f s",
                stream.method,
                stream.principal.name or "the local caller",
                stream.context.peer(),
                self.send_timeout,
            )
            stream.context.cancel()
        return len(stalled)

    def start(self) -> None:
        """Start the reaper thread (`drop_stalled` every `REAP_SECONDS`)."""
        self._reaper = threading.Thread(target=self._reap, name="stream-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5.0)

    def _reap(self) -> None:
        while not self._stopped.wait(REAP_SECONDS):
            self.drop_stalled()
