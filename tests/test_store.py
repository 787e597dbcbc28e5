"""The SQLite store: sequences without gaps, paging, transitions, reopening."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import pytest

from naive_model.config import TrainConfig
from service.jobs.schema import SCHEMA_VERSION
from service.jobs.store import JobRecord, Store
from service.protocol import JobSpec, JobState, Progress, StateChange, TrainingResult

SPEC = JobSpec(train=TrainConfig(epochs=2), dataset="synthetic")
PROGRESS = Progress(
    epoch=1,
    epochs=2,
    step=10,
    steps_per_epoch=16,
    step_in_epoch=10,
    loss=0.5,
    accuracy=0.75,
    examples_per_second=1000.0,
    examples=1280,
)
RESULT = TrainingResult(
    train_loss=0.1,
    train_accuracy=0.95,
    test_loss=0.2,
    test_accuracy=0.9,
    steps=32,
    train_seconds=1.5,
    examples_per_second=3000.0,
    has_model=True,
)


def new_job(store: Store, job_id: str, time: float = 1.0) -> None:
    record = JobRecord(
        job_id=job_id,
        request_id=f"req-{job_id}",
        spec=SPEC,
        state=JobState.QUEUED,
        create_time=time,
    )
    store.create_job(record, time)


def test_events_are_numbered_from_1_without_gaps_and_update_the_job(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-a")
    store.append_event("job-a", StateChange(state=JobState.STARTING), 2.0, devices=("GPU:1",))
    store.append_event("job-a", PROGRESS, 3.0)
    store.append_event(
        "job-a", StateChange(state=JobState.FAILED, reason="boom"), 4.0, failure_reason="boom"
    )

    events = store.events_after("job-a", 0)
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert [type(e.payload) for e in events] == [StateChange, StateChange, Progress, StateChange]
    assert events[2].payload == PROGRESS
    assert [e.sequence for e in store.events_after("job-a", 2)] == [3, 4]

    job = store.get_job("job-a")
    assert job.state is JobState.FAILED and job.finished and job.failure_reason == "boom"
    assert job.devices == ("GPU:1",) and job.progress == PROGRESS and job.spec == SPEC
    assert job.last_sequence == 4
    assert [(t.state, t.time) for t in job.transitions] == [
        (JobState.QUEUED, 1.0),
        (JobState.STARTING, 2.0),
        (JobState.FAILED, 4.0),
    ]


def test_list_is_newest_first_filtered_and_paged(tmp_path):
    store = Store(tmp_path)
    for index in range(5):
        new_job(store, f"job-{index}", time=float(index))
    store.append_event("job-3", StateChange(state=JobState.CANCELED), 9.0)

    page, cursor = store.list_jobs(limit=2)
    assert [j.job_id for j in page] == ["job-4", "job-3"]
    page, cursor = store.list_jobs(limit=2, before=cursor)
    assert [j.job_id for j in page] == ["job-2", "job-1"]
    page, cursor = store.list_jobs(limit=2, before=cursor)
    assert [j.job_id for j in page] == ["job-0"] and cursor is None

    canceled, _ = store.list_jobs(states=(JobState.CANCELED,))
    assert [j.job_id for j in canceled] == ["job-3"]
    assert store.count_by_state()[JobState.QUEUED] == 4
    assert [j.job_id for j in store.unfinished_jobs()] == ["job-0", "job-1", "job-2", "job-4"]


def test_request_ids_are_unique_per_owner(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-a")
    assert store.find_by_request_id("", "req-job-a").job_id == "job-a"
    record = JobRecord(
        job_id="job-b", request_id="req-job-a", spec=SPEC, state=JobState.QUEUED, create_time=2.0
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.create_job(record, 2.0)
    assert store.get_job("job-b") is None
    # Another owner's key of the same text is another job.
    store.create_job(JobRecord(**{**record.__dict__, "owner": "bob"}), 2.0)
    assert store.get_job("job-b").owner == "bob"
    assert store.find_by_request_id("bob", "req-job-a").job_id == "job-b"
    assert store.find_by_request_id("", "req-job-a").job_id == "job-a"
    assert store.find_by_request_id("carol", "req-job-a") is None


def test_reopening_keeps_everything_and_uses_wal(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-a")
    store.append_event("job-a", RESULT, 2.0)
    store.close()

    reopened = Store(tmp_path)
    assert reopened.get_job("job-a").result == RESULT
    assert [e.sequence for e in reopened.events_after("job-a", 0)] == [1, 2]
    assert reopened.job_dir("job-a") == tmp_path / "jobs" / "job-a"
    mode = sqlite3.connect(tmp_path / "ntrain.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_unknown_job_and_kind(tmp_path):
    store = Store(tmp_path)
    assert store.get_job("job-none") is None
    with pytest.raises(KeyError):
        store.append_event("job-none", PROGRESS, 1.0)
    new_job(store, "job-a")
    with pytest.raises(TypeError, match="payload"):
        store.append_event("job-a", {"state": "gossip"}, 1.0)


def test_progress_rows_written_before_the_per_call_fields_still_read(tmp_path):
    """A database from before Progress had call_* fields opens unchanged."""
    store = Store(tmp_path)
    new_job(store, "job-a")
    old_row = (
        '{"epoch": 1, "epochs": 2, "step": 10, "steps_per_epoch": 16, "step_in_epoch": 10,'
        ' "loss": 0.5, "accuracy": 0.75, "examples_per_second": 1000.0, "examples": 1280}'
    )
    store.close()
    db = sqlite3.connect(tmp_path / "ntrain.db")
    db.execute("INSERT INTO events VALUES ('job-a', 2, 2.0, 'progress', ?)", (old_row,))
    db.execute("UPDATE jobs SET progress = ?, last_sequence = 2 WHERE job_id = 'job-a'", (old_row,))
    db.commit()
    db.close()

    reopened = Store(tmp_path)
    assert reopened.get_job("job-a").progress == PROGRESS
    assert reopened.events_after("job-a", 1)[0].payload == PROGRESS


# The jobs table as schema version 1 created it (no owner; request_id unique over all jobs).
_VERSION_1_JOBS = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    request_id TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    create_time REAL NOT NULL,
    strategy TEXT NOT NULL DEFAULT '',
    devices TEXT NOT NULL DEFAULT '[]',
    failure_reason TEXT NOT NULL DEFAULT '',
    progress TEXT,
    result TEXT,
    last_sequence INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_by_state ON jobs (state, seq);
CREATE TABLE events (
    job_id TEXT NOT NULL REFERENCES jobs (job_id),
    sequence INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
PRAGMA user_version=1;
"""


def test_a_version_1_database_opens_with_every_job_unowned(tmp_path):
    """Jobs and events of a database from before owners survive, in order, owned by ""."""
    db = sqlite3.connect(tmp_path / "ntrain.db")
    db.executescript(_VERSION_1_JOBS)
    spec = json.dumps(SPEC.to_dict(), sort_keys=True)
    for index in range(3):
        db.execute(
            "INSERT INTO jobs (job_id, request_id, spec, state, create_time, last_sequence)"
            " VALUES (?, ?, ?, 'QUEUED', ?, 1)",
            (f"job-{index}", f"req-{index}", spec, float(index)),
        )
        db.execute(
            'INSERT INTO events VALUES (?, 1, ?, \'state\', \'{"state": "QUEUED", "reason": ""}\')',
            (f"job-{index}", float(index)),
        )
    db.commit()
    db.close()

    store = Store(tmp_path)
    jobs, _ = store.list_jobs()
    assert [(j.job_id, j.owner, j.request_id) for j in jobs] == [
        ("job-2", "", "req-2"), ("job-1", "", "req-1"), ("job-0", "", "req-0"),
    ]  # fmt: skip
    assert [e.sequence for e in store.events_after("job-1", 0)] == [1]
    assert store.find_by_request_id("", "req-1").job_id == "job-1"
    store.append_event("job-1", StateChange(state=JobState.CANCELED), 5.0)
    new_job(store, "job-3", time=3.0)  # a new job comes after the migrated ones
    assert store.list_jobs(limit=1)[0][0].job_id == "job-3"
    store.close()

    db = sqlite3.connect(tmp_path / "ntrain.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {row[1] for row in db.execute("PRAGMA index_list(jobs)")}
    assert {"jobs_by_state", "jobs_by_request_id"} <= indexes
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []  # every event has its job
    db.close()
    reopened = Store(tmp_path)
    assert reopened.get_job("job-1").state is JobState.CANCELED  # and it opens again
    assert reopened.get_job("job-1").restarts == 0 and reopened.count_restart("job-1") == 1


def test_a_version_3_database_opens_and_its_jobs_have_no_labels(tmp_path):
    """Version 3 had no job_labels table, and specs stored without a name or labels."""
    store = Store(tmp_path)
    new_job(store, "job-old")
    store.close()
    db = sqlite3.connect(tmp_path / "ntrain.db")
    old_spec = SPEC.to_dict()
    del old_spec["name"], old_spec["labels"]  # as version 3 stored specs
    db.execute("UPDATE jobs SET spec = ?", (json.dumps(old_spec, sort_keys=True),))
    db.executescript(
        "DROP TABLE job_labels; ALTER TABLE jobs DROP COLUMN preemptions; PRAGMA user_version=3;"
    )
    db.close()

    store = Store(tmp_path)
    old = store.get_job("job-old")
    assert (old.spec.name, old.spec.labels) == ("", ()) and old.spec == SPEC
    labelled = dataclasses.replace(SPEC, name="run 2", labels=(("team", "vision"), ("v", "2")))
    store.create_job(
        JobRecord(
            job_id="job-new", request_id="r", spec=labelled, state=JobState.QUEUED, create_time=2.0
        ),
        2.0,
    )
    assert [j.job_id for j in store.list_jobs()[0]] == ["job-new", "job-old"]
    assert [j.job_id for j in store.list_jobs(labels=(("team", "vision"),))[0]] == ["job-new"]
    both = (("team", "vision"), ("v", "2"))
    assert [j.job_id for j in store.list_jobs(labels=both)[0]] == ["job-new"]
    assert store.list_jobs(labels=(("team", "vision"), ("v", "3")))[0] == []
    assert store.get_job("job-new").spec == labelled
    store.close()
    db = sqlite3.connect(tmp_path / "ntrain.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_a_version_4_database_gains_preemptions_at_zero(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-old")
    store.close()
    db = sqlite3.connect(tmp_path / "ntrain.db")
    db.executescript("ALTER TABLE jobs DROP COLUMN preemptions; PRAGMA user_version=4;")
    db.close()

    store = Store(tmp_path)
    assert store.get_job("job-old").preemptions == 0
    assert store.count_preemption("job-old") == 1
    assert store.get_job("job-old").preemptions == 1
    store.close()


def test_a_newer_database_is_refused_untouched(tmp_path):
    db = sqlite3.connect(tmp_path / "ntrain.db")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        Store(tmp_path)
    mode = sqlite3.connect(tmp_path / "ntrain.db").execute("PRAGMA journal_mode").fetchone()
    assert mode == ("delete",)  # not switched to WAL before it was refused


def _instructions_to_read(store: Store, job_id: str) -> int:
    """SQLite virtual-machine instructions that reading the job's record takes."""
    count = [0]

    def counted() -> int:
        count[0] += 1
        return 0  # go on

    store._db.set_progress_handler(counted, 1)
    try:
        assert store.get_job(job_id) is not None
    finally:
        store._db.set_progress_handler(None, 1)
    return count[0]


def test_reading_a_record_does_not_scan_its_progress_events(tmp_path):
    # A record's transitions come from an index of state changes: a job that has
    # reported 5,000 progress events reads as cheaply as one that reported 5.
    # (Without the index every GetJob, and every event with an observer, scanned
    # them all: 7.6 ms a read at 100,000 events.)
    store = Store(tmp_path)
    for job_id, events in (("job-short", 5), ("job-long", 5_000)):
        new_job(store, job_id)
        store.append_event(job_id, StateChange(state=JobState.RUNNING), 2.0)
        for _ in range(events):
            store.append_event(job_id, PROGRESS, 3.0)
    short, long = (_instructions_to_read(store, j) for j in ("job-short", "job-long"))
    assert long <= short * 1.1, (short, long)
    assert [t.state for t in store.get_job("job-long").transitions] == [
        JobState.QUEUED,
        JobState.RUNNING,
    ]
    store.close()


def test_a_database_from_before_the_state_change_index_gains_it(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-old")
    store.append_event("job-old", StateChange(state=JobState.RUNNING), 2.0)
    store.close()
    db = sqlite3.connect(tmp_path / "ntrain.db")
    db.execute("DROP INDEX events_state_changes")
    db.close()

    store = Store(tmp_path)
    assert [t.state for t in store.get_job("job-old").transitions] == [
        JobState.QUEUED,
        JobState.RUNNING,
    ]
    store.close()
