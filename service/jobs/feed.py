"""The readers' view of the store: recent records and events, and a wake-up per job.

Every watcher of a running job asks, at every event, for the job's record and
its new events; GetJob asks for the record. `JobFeed` answers from memory
until the job next changes: job records (LRU, each dropped when its job
changes), the newest events of the jobs that changed last, and one condition
per watched job, so an event wakes only that job's watchers. The control
loop, which alone writes jobs, reports each change here after storing it.

The lock is the feed's own. A record is read from the store and cached
under it, and a change drops the cached record under it, so a reader never
caches a record older than a change already reported.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Sequence

from service.jobs.errors import NotFound
from service.jobs.store import Event, JobRecord, Store
from service.protocol import StateChange

# Job records kept in memory for GetJob and watchers (each dropped when its job changes).
RECORD_CACHE_SIZE = 1024
# The newest events of the jobs that changed last, for their watchers.
RECENT_EVENTS = 256
RECENT_EVENT_JOBS = 64


class JobFeed:
    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()
        self._conditions: dict[str, threading.Condition] = {}
        self._records: OrderedDict[str, JobRecord] = OrderedDict()
        self._recent: OrderedDict[str, deque[Event]] = OrderedDict()

    def record(self, job_id: str) -> JobRecord:
        """The job as stored, from memory when it has not changed since last read.

        Raises:
            NotFound: no such job.
        """
        with self._lock:
            return self._record(job_id)

    def _record(self, job_id: str) -> JobRecord:
        record = self._records.get(job_id)
        if record is not None:
            self._records.move_to_end(job_id)
            return record
        # Read under the lock, so no change can slip between the read and the caching.
        record = self.store.get_job(job_id)
        if record is None:
            raise NotFound(f"job {job_id!r} does not exist")
        self._records[job_id] = record
        if len(self._records) > RECORD_CACHE_SIZE:
            self._records.popitem(last=False)
        return record

    def events_after(self, job_id: str, last: int) -> Sequence[Event]:
        """The job's events after `last`: from memory when the recent ones reach back that far.

        Reading new events from memory spares SQLite a query per watcher per event.
        """
        with self._lock:
            recent = self._recent.get(job_id)
            if recent and recent[0].sequence <= last + 1:
                return [event for event in recent if event.sequence > last]
        return self.store.events_after(job_id, last)

    def wait_for_change(self, job_id: str, seen_sequence: int, timeout: float) -> None:
        """Wait until the job changes, or `timeout` passes.

        Returns at once when the job has events past `seen_sequence` already:
        a change reported between the caller's last read and this wait is not lost.
        """
        with self._lock:
            if self._record(job_id).last_sequence > seen_sequence:
                return
            condition = self._conditions.get(job_id)
            if condition is None:
                condition = self._conditions[job_id] = threading.Condition(self._lock)
            condition.wait(timeout)

    def stored(self, event: Event) -> None:
        """An event was stored: keep it among the recent ones, and report the change."""
        with self._lock:
            recent = self._recent.get(event.job_id)
            if recent is None or (recent and recent[-1].sequence != event.sequence - 1):
                recent = self._recent[event.job_id] = deque(maxlen=RECENT_EVENTS)
            recent.append(event)
            self._recent.move_to_end(event.job_id)
            if len(self._recent) > RECENT_EVENT_JOBS:
                self._recent.popitem(last=False)
        self.changed(event.job_id)
        if isinstance(event.payload, StateChange) and event.payload.state.finished:
            with self._lock:  # its watchers were woken and see the end: none waits again
                self._conditions.pop(event.job_id, None)

    def changed(self, job_id: str) -> None:
        """The job changed: drop its cached record and wake its watchers."""
        with self._lock:
            self._records.pop(job_id, None)
            condition = self._conditions.get(job_id)
            if condition is not None:
                condition.notify_all()

    def wake_all(self) -> None:
        """Wake every watcher (the server is shutting down)."""
        with self._lock:
            for condition in self._conditions.values():
                condition.notify_all()
