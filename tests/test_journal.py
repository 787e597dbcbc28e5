"""Each job's journal, and the store checked and rebuilt from the journals.

The damage a kill -9 and a lost file do to a real server's store is in
tests/test_store_recovery.py; here the store is damaged by hand, in
milliseconds.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from test_store import PROGRESS, RESULT, new_job

from service.cli.app import main
from service.jobs import journal
from service.jobs.errors import Unavailable
from service.jobs.reconcile import (
    Fix,
    StoreNeedsRepair,
    backup,
    check,
    open_checked,
)
from service.jobs.store import Store
from service.protocol import CheckpointSaved, JobState, StateChange

CHECKPOINT = CheckpointSaved(path="ckpt-10", epoch=1, step=10, seconds=0.1)


def _history(store: Store, job_id: str) -> None:
    """A job that ran to its end: every kind of write the store takes."""
    store.append_event(job_id, StateChange(state=JobState.STARTING), 2.0, devices=("CPU",))
    store.append_event(job_id, StateChange(state=JobState.RUNNING), 3.0, strategy="cpu")
    store.append_event(job_id, PROGRESS, 4.0)
    store.record_checkpoint(job_id, CHECKPOINT)
    store.count_restart(job_id)
    store.count_preemption(job_id)
    store.append_event(job_id, RESULT, 5.0)
    store.append_event(job_id, StateChange(state=JobState.SUCCEEDED), 6.0)


def _state_dir_with_jobs(tmp_path: Path) -> list:
    store = Store(tmp_path)
    for index in range(3):
        new_job(store, f"job-{index}", time=float(index))
    _history(store, "job-1")
    records = [store.get_job(f"job-{index}") for index in range(3)]
    store.close()
    return records


def test_the_journal_holds_every_write_and_rebuilds_a_lost_database(tmp_path):
    records = _state_dir_with_jobs(tmp_path)
    lines = (tmp_path / "jobs/job-1/journal.jsonl").read_text().splitlines()
    assert len(lines) == 9  # 6 events, a checkpoint, a restart and a preemption
    assert json.loads(lines[1])["devices"] == ["CPU"]
    for suffix in ("", "-wal", "-shm"):  # a 0-byte database, its WAL gone
        path = tmp_path / f"ntrain.db{suffix}"
        path.unlink(missing_ok=True)
    (tmp_path / "ntrain.db").write_bytes(b"")

    store = open_checked(tmp_path)
    rebuilt = [store.get_job(f"job-{index}") for index in range(3)]
    assert rebuilt == records  # transitions, checkpoint, counts, progress, result
    assert [job.job_id for job in store.list_jobs()[0]] == ["job-2", "job-1", "job-0"]
    assert [event.sequence for event in store.events_after("job-1", 0)] == list(range(1, 7))
    assert check(store) == []


def test_a_record_behind_its_journal_is_rebuilt_and_a_succeeded_job_stays_succeeded(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-a")
    snapshot = tmp_path / "older.db"
    backup(tmp_path, snapshot)  # the store as a lost WAL would leave it: QUEUED
    _history(store, "job-a")
    store.close()
    os.replace(snapshot, tmp_path / "ntrain.db")

    store = Store(tmp_path)
    [found] = check(store)
    assert found.fix is Fix.REBUILD_RECORD
    assert str(found) == (
        "job job-a: the record holds 1 events (QUEUED), its journal 6 (SUCCEEDED); "
        "repair: rebuild the record from the journal"
    )
    store.close()
    store = open_checked(tmp_path)
    assert store.get_job("job-a").state is JobState.SUCCEEDED
    assert store.unfinished_jobs() == []  # nothing to run again


def test_a_write_the_database_refuses_is_cut_from_the_journal(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-a")
    journal_path = tmp_path / "jobs/job-a/journal.jsonl"
    before = journal_path.read_bytes()
    store._db.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'no'); END"
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.append_event("job-a", PROGRESS, 2.0)
    assert journal_path.read_bytes() == before
    assert check(store) == []


def test_a_journal_write_that_fails_says_which_file_and_leaves_the_database_alone(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-a")
    path = tmp_path / "jobs/job-a/journal.jsonl"
    path.unlink()
    path.mkdir()  # unwritable, whoever runs the test
    with pytest.raises(Unavailable, match="cannot write the job journal .*journal.jsonl"):
        store.append_event("job-a", PROGRESS, 2.0)
    assert store.get_job("job-a").last_sequence == 1


def test_a_job_from_before_journals_gets_one(tmp_path):
    store = Store(tmp_path)
    new_job(store, "job-a")
    for name in ("job.json", "journal.jsonl"):
        (tmp_path / "jobs/job-a" / name).unlink()
    assert [item.fix for item in check(store)] == [Fix.WRITE_JOURNAL]
    store.append_event("job-a", PROGRESS, 2.0)  # writes the journal from the record first
    assert journal.read_journal(tmp_path / "jobs/job-a").last_sequence == 2
    assert check(store) == []


def test_what_the_server_does_not_repair_stops_it_with_one_line_and_repair_does(tmp_path, capsys):
    _state_dir_with_jobs(tmp_path)
    (tmp_path / "jobs/job-stray").mkdir()  # no record, no journal
    os.rename(tmp_path / "jobs/job-0", tmp_path / "gone")  # a record without its folder
    with pytest.raises(StoreNeedsRepair) as refused:
        open_checked(tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert "disagree: job job-stray: the folder " in message
    assert f"(and 1 more: `ntrain store check --state-dir {tmp_path}`)" in message
    assert message.endswith(f"`ntrain store repair --state-dir {tmp_path}` repairs it")

    assert main(["store", "check", "--state-dir", str(tmp_path)]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("job job-stray: the folder ")
    assert printed[0].endswith(
        "has no record and no journal; repair: move the folder to lost+found/"
    )
    assert printed[1].startswith("job job-0: a QUEUED record with 1 events, and no folder")
    assert printed[2].startswith("2 disagreements (0 the server repairs itself at start)")

    assert main(["store", "repair", "--state-dir", str(tmp_path)]) == 0
    assert (tmp_path / "lost+found/job-stray").is_dir()
    assert main(["store", "check", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "the store's 3 jobs and their folders agree"
    open_checked(tmp_path).close()


def test_a_damaged_database_is_refused_and_repair_rebuilds_it(tmp_path, capsys):
    records = _state_dir_with_jobs(tmp_path)
    with open(tmp_path / "ntrain.db", "r+b") as db:
        db.write(b"not a database, not at all")
    with pytest.raises(StoreNeedsRepair, match="ntrain.db is damaged .* sets it aside"):
        open_checked(tmp_path)
    assert main(["store", "repair", "--state-dir", str(tmp_path)]) == 0
    assert list(tmp_path.glob("ntrain.db.damaged-*"))
    store = open_checked(tmp_path)
    assert [store.get_job(record.job_id) for record in records] == records


def test_repair_refuses_while_a_server_holds_the_directory(tmp_path, capsys):
    from service.jobs.lock import StateDirLock

    _state_dir_with_jobs(tmp_path)
    lock = StateDirLock(tmp_path)
    lock.acquire()
    try:
        assert main(["store", "repair", "--state-dir", str(tmp_path)]) == 1
    finally:
        lock.release()
    assert "in use by another ntrain server" in capsys.readouterr().err


def test_a_backup_taken_while_the_store_writes_opens_and_lists_every_job(tmp_path, capsys):
    store = Store(tmp_path / "state")
    for index in range(20):
        new_job(store, f"job-{index}", time=float(index))
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            store.append_event("job-3", PROGRESS, 9.0)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        target = tmp_path / "backup.db"
        assert (
            main(["store", "backup", "--state-dir", str(tmp_path / "state"), "--to", str(target)])
            == 0
        )
    finally:
        stop.set()
        writer.join()
    assert capsys.readouterr().out.startswith(f"backed up 20 jobs to {target}")
    restored = tmp_path / "restored"
    restored.mkdir()
    os.replace(target, restored / "ntrain.db")
    copy = Store(restored)
    assert len(copy.list_jobs(limit=100)[0]) == 20
    events = copy.events_after("job-3", 0)
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))


def test_the_start_reads_a_long_journal_by_its_end_and_still_sees_a_line_the_store_lacks(
    tmp_path,
):
    store = Store(tmp_path)
    new_job(store, "job-a")
    for index in range(300):  # past the 64 KiB the quick check reads
        store.append_event("job-a", PROGRESS, 2.0 + index)
    assert (tmp_path / "jobs/job-a/journal.jsonl").stat().st_size > journal.TAIL_BYTES
    assert check(store, thorough=False) == []
    # A kill -9 between the journal's line and the database's write.
    journal.append(tmp_path / "jobs/job-a", journal.checkpoint_line(CHECKPOINT))
    journal.append(tmp_path / "jobs/job-a", {"restarts": 1})
    [found] = check(store, thorough=False)
    assert str(found) == (
        "job job-a: the record's checkpoint and restarts differ from the journal's; "
        "repair: rebuild the record from the journal"
    )
    store.close()
    store = open_checked(tmp_path)
    record = store.get_job("job-a")
    assert (record.checkpoint, record.restarts, record.last_sequence) == (CHECKPOINT, 1, 301)
