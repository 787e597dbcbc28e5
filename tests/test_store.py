"""The SQLite store: sequences without gaps, paging, transitions, reopening."""

from __future__ import annotations

import sqlite3

import pytest

from service.store import JobRecord, Store


def new_job(store: Store, job_id: str, time: float = 1.0) -> None:
    record = JobRecord(
        job_id=job_id,
        request_id=f"req-{job_id}",
        spec={"dataset": "synthetic"},
        state="QUEUED",
        create_time=time,
    )
    store.create_job(record, time)


def test_events_are_numbered_from_1_without_gaps_and_update_the_job(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-a")
    store.append_event(
        "job-a", "state", {"state": "STARTING", "reason": ""}, 2.0, devices=("GPU:1",)
    )
    store.append_event("job-a", "progress", {"epoch": 1, "loss": 0.5}, 3.0)
    store.append_event(
        "job-a", "state", {"state": "FAILED", "reason": "boom"}, 4.0, failure_reason="boom"
    )

    events = store.events_after("job-a", 0)
    assert [e.sequence for e in events] == [1, 2, 3, 4]
    assert [e.kind for e in events] == ["state", "state", "progress", "state"]
    assert [e.sequence for e in store.events_after("job-a", 2)] == [3, 4]

    job = store.get_job("job-a")
    assert job.state == "FAILED" and job.finished and job.failure_reason == "boom"
    assert job.devices == ("GPU:1",) and job.progress == {"epoch": 1, "loss": 0.5}
    assert job.last_sequence == 4
    assert [(t.state, t.time) for t in job.transitions] == [
        ("QUEUED", 1.0),
        ("STARTING", 2.0),
        ("FAILED", 4.0),
    ]


def test_list_is_newest_first_filtered_and_paged(tmp_path):
    store = Store(tmp_path)
    for index in range(5):
        new_job(store, f"job-{index}", time=float(index))
    store.append_event("job-3", "state", {"state": "CANCELED", "reason": ""}, 9.0)

    page, cursor = store.list_jobs(limit=2)
    assert [j.job_id for j in page] == ["job-4", "job-3"]
    page, cursor = store.list_jobs(limit=2, before=cursor)
    assert [j.job_id for j in page] == ["job-2", "job-1"]
    page, cursor = store.list_jobs(limit=2, before=cursor)
    assert [j.job_id for j in page] == ["job-0"] and cursor is None

    canceled, _ = store.list_jobs(states=("CANCELED",))
    assert [j.job_id for j in canceled] == ["job-3"]
    assert store.count_by_state()["QUEUED"] == 4
    assert [j.job_id for j in store.unfinished_jobs()] == ["job-0", "job-1", "job-2", "job-4"]


def test_request_ids_are_unique(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-a")
    assert store.find_by_request_id("req-job-a").job_id == "job-a"
    record = JobRecord(
        job_id="job-b", request_id="req-job-a", spec={}, state="QUEUED", create_time=2.0
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.create_job(record, 2.0)
    assert store.get_job("job-b") is None


def test_reopening_keeps_everything_and_uses_wal(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-a")
    store.append_event("job-a", "result", {"test_accuracy": 0.9}, 2.0)
    store.close()

    reopened = Store(tmp_path)
    assert reopened.get_job("job-a").result == {"test_accuracy": 0.9}
    assert [e.sequence for e in reopened.events_after("job-a", 0)] == [1, 2]
    assert reopened.job_dir("job-a") == tmp_path / "jobs" / "job-a"
    mode = sqlite3.connect(tmp_path / "ntrain.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_unknown_job_and_kind(tmp_path):
    store = Store(tmp_path)
    assert store.get_job("job-none") is None
    with pytest.raises(KeyError):
        store.append_event("job-none", "progress", {}, 1.0)
    new_job(store, "job-a")
    with pytest.raises(ValueError, match="kind"):
        store.append_event("job-a", "gossip", {}, 1.0)
