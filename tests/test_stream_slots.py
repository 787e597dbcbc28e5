"""Stream slots shared fairly among principals, and streams whose client stopped reading dropped.

No server here (a fake clock and fake call contexts); test_streams.py has the
real server, real clients and a real training job.
"""

from __future__ import annotations

import logging
import time

import pytest

from service.api import streams
from service.api.streams import StreamSlots
from service.jobs.access import LOCAL, Principal
from service.jobs.errors import ResourceExhausted, Unavailable

VIEWER = Principal(name="viewer", role="viewer")
OWNER = Principal(name="alice", role="trainer")


class FakeContext:
    def __init__(self, peer: str = "ipv4:127.0.0.1:5000"):
        self.cancelled = 0
        self._peer = peer

        self.trailing_metadata: tuple[tuple[str, str], ...] = ()
        self.client_here = True

    def cancel(self) -> bool:
        self.cancelled += 1
        return True

    def peer(self) -> str:
        return self._peer

    def is_active(self) -> bool:
        return self.client_here

    def set_trailing_metadata(self, trailing_metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing_metadata = trailing_metadata


def test_one_principal_holds_its_share_and_leaves_the_rest_to_others():
    slots = StreamSlots(total=4, per_principal=2)
    held = [slots.slot("WatchJob", VIEWER, FakeContext()) for _ in range(2)]
    for slot in held:
        slot.__enter__()
    with pytest.raises(ResourceExhausted) as refused:
        slots.slot("WatchJob", VIEWER, FakeContext()).__enter__()
    assert str(refused.value) == (
        "WatchJob: viewer has 2 streams open (WatchJob, GetJobLogs and DownloadModel "
        "together), its limit of 2 per principal; close one or retry later"
    )
    with slots.slot("GetJobLogs", OWNER, FakeContext()):  # the owner still follows its job
        assert slots.held(OWNER) == 1 and len(slots) == 3
    held[0].__exit__(None, None, None)
    with slots.slot("WatchJob", VIEWER, FakeContext()):  # a freed slot is the viewer's again
        assert slots.held(VIEWER) == 2
    held[1].__exit__(None, None, None)
    assert len(slots) == 0 and slots.held(VIEWER) == 0


def test_the_total_bounds_everyone_and_the_anonymous_local_caller_may_use_it_all():
    slots = StreamSlots(total=3, per_principal=8)  # a share above the total is the total
    assert slots.per_principal == 3 and slots.limit(LOCAL) == 3
    contexts = [slots.slot("WatchJob", LOCAL, FakeContext()) for _ in range(3)]
    for slot in contexts:
        slot.__enter__()
    with pytest.raises(ResourceExhausted, match="^DownloadModel: 3 streams are open .*server's"):
        slots.slot("DownloadModel", OWNER, FakeContext()).__enter__()
    fair = StreamSlots(total=10, per_principal=2)
    assert fair.limit(LOCAL) == 10 and fair.limit(VIEWER) == 2  # no tokens: one caller


def test_a_stream_whose_message_waits_past_the_timeout_is_cancelled_once(caplog):
    now = [100.0]
    slots = StreamSlots(total=4, per_principal=4, send_timeout=30.0, clock=lambda: now[0])
    slow, fast = FakeContext("ipv4:127.0.0.1:7"), FakeContext()
    with (
        slots.slot("WatchJob", VIEWER, slow) as slow_stream,
        slots.slot("WatchJob", OWNER, fast) as fast_stream,
    ):
        slow_messages = slots.send(slow_stream, iter(["a", "b"]))
        fast_messages = slots.send(fast_stream, iter(["a", "b", "c"]))
        assert next(slow_messages) == "a"  # handed to gRPC; the client takes nothing
        assert slow_stream.waiting_since == 100.0
        for _ in range(3):  # the fast reader takes each message at once
            now[0] += 10.0
            next(fast_messages)
        now[0] += 0.1
        assert fast_stream.waiting_since == now[0] - 0.1  # its newest message is 0.1 s old
        with caplog.at_level(logging.WARNING, logger="service.api.streams"):
            assert slots.drop_stalled() == 1
            assert slots.drop_stalled() == 0  # cancelled once
        assert (slow.cancelled, fast.cancelled) == (1, 0)
        assert caplog.records[0].getMessage() == (
            "dropped a WatchJob stream of viewer from ipv4:127.0.0.1:7: it took no message for 30 s"
        )
    assert len(slots) == 0  # the slots come back when the handlers end


def test_the_reaper_thread_drops_a_stalled_stream(monkeypatch):
    monkeypatch.setattr(streams, "REAP_SECONDS", 0.01)
    slots, context = StreamSlots(total=1, per_principal=1, send_timeout=0.05), FakeContext()
    slots.start()
    try:
        with slots.slot("GetJobLogs", VIEWER, context) as stream:
            next(slots.send(stream, iter(["a"])))
            deadline = time.monotonic() + 10
            while not context.cancelled:
                assert time.monotonic() < deadline, "the reaper did not drop the stream"
                time.sleep(0.01)
    finally:
        slots.stop()


def _events(stream, count: int):
    """A watch's events as `JobManager.watch` gives them: it waits while `is_active` holds."""
    yield from range(count)
    while stream.is_active():
        yield "idle"  # stands for a wait that ends when nothing came


def test_a_resumable_stream_ends_for_renewal_at_its_age_and_others_never_age():
    now = [100.0]
    slots = StreamSlots(
        total=4, per_principal=4, max_age=600.0, clock=lambda: now[0], spread=lambda: 0.5
    )
    watch, download = FakeContext(), FakeContext()
    with (
        slots.slot("WatchJob", VIEWER, watch, resumable=True) as watching,
        slots.slot("DownloadModel", VIEWER, download) as downloading,
    ):
        assert watching.ends_at == 100.0 + 600.0 * 1.25  # a quarter more: spread 0.5 of 0.5
        assert downloading.ends_at is None
        messages = slots.send(watching, _events(watching, 3))
        assert [next(messages) for _ in range(3)] == [0, 1, 2]
        now[0] += 749.0
        assert next(messages) == "idle" and watching.is_active()
        now[0] += 1.0
        assert not watching.is_active()  # what the watch waits on: it stops waiting
        with pytest.raises(Unavailable, match="WatchJob stream reached its age limit"):
            next(messages)
        assert watch.trailing_metadata == (streams.RENEW_METADATA,)
        parts = slots.send(downloading, iter(["part"]))
        assert list(parts) == ["part"] and downloading.is_active()  # never ages
        assert download.trailing_metadata == ()


def test_a_stream_that_ends_by_itself_before_its_age_ends_as_usual():
    slots = StreamSlots(total=1, per_principal=1, max_age=600.0)
    context = FakeContext()
    with slots.slot("GetJobLogs", OWNER, context, resumable=True) as stream:
        assert list(slots.send(stream, iter(["line"]))) == ["line"]
    assert context.trailing_metadata == ()
    never = StreamSlots(total=1, per_principal=1, max_age=0.0)  # --stream-max-age 0
    with never.slot("WatchJob", OWNER, FakeContext(), resumable=True) as stream:
        assert stream.ends_at is None
