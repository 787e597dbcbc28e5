"""The store against the job folders' journals: check, rebuild, and back up.

Every job folder must have a record and every record its folder, and a
record must hold what its journal holds (`service.jobs.journal`: written
before the database, so after a kill -9 it is at most one write ahead).
`check` lists every disagreement with what `repair` does about it. The
server opens its store through `open_checked`: it makes the repairs that
lose nothing (a record rebuilt from a journal that is ahead of it, a journal
written from a record that is ahead of it) with one log line per job, and
refuses to start, naming what is missing and `ntrain store repair`, when a
repair would need an operator's judgement (a folder that no journal
explains, a record whose folder is gone, a damaged journal or database).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from service.jobs import journal
from service.jobs.store import JobRecord, Store

log = logging.getLogger(__name__)

LOST_AND_FOUND = "lost+found"  # in the state directory: folders repair set aside


class Fix(enum.Enum):
    """What `repair` does about a disagreement."""

    REBUILD_RECORD = "rebuild the record from the journal"
    WRITE_JOURNAL = "write the journal from the record"
    RECREATE_FOLDER = "recreate the folder, with a journal written from the record"
    REPLACE_JOURNAL = "replace the damaged journal with one written from the record"
    DROP_UNFINISHED = "remove the job.json of a submission the store never took"
    SET_ASIDE = f"move the folder to {LOST_AND_FOUND}/"
    REBUILD_DATABASE = "set the database aside and rebuild it from the journals"

    @property
    def automatic(self) -> bool:
        """Whether the server makes this repair itself at start: it loses nothing."""
        return self in (Fix.REBUILD_RECORD, Fix.WRITE_JOURNAL, Fix.DROP_UNFINISHED)


@dataclass(frozen=True)
class Disagreement:
    job_id: str  # "" for the database itself
    problem: str  # one line
    fix: Fix

    def __str__(self) -> str:
        subject = f"job {self.job_id}" if self.job_id else "the database"
        return f"{subject}: {self.problem}; repair: {self.fix.value}"


class StoreNeedsRepair(RuntimeError):
    """The store and the job folders disagree in a way the server does not repair itself."""


def repair_command(state_dir: Path) -> str:
    return f"ntrain store repair --state-dir {state_dir}"


def open_store(state_dir: Path) -> Store:
    """The store, or StoreNeedsRepair naming the damaged database and the command."""
    try:
        store = Store(state_dir)
        store.integrity_problem()  # a damaged file may open, and fail on the first read
        return store
    except sqlite3.DatabaseError as error:
        raise StoreNeedsRepair(
            f"{Path(state_dir) / 'ntrain.db'} is damaged ({error}): "
            f"`{repair_command(state_dir)}` sets it aside and rebuilds it from the job folders"
        ) from error


def check(store: Store, *, thorough: bool = True) -> list[Disagreement]:
    """Every disagreement between the store and the job folders, the database's first.

    Args:
        thorough: read every journal whole (every line checked); otherwise a
            journal whose end matches its record is taken as agreeing, which
            keeps the server's start quick however long the histories are.
    """
    found: list[Disagreement] = []
    problem = store.integrity_problem()
    if problem:
        found.append(Disagreement("", f"{store.path} is damaged: {problem}", Fix.REBUILD_DATABASE))
    records = {job_id: store.get_job(job_id) for job_id in store.job_ids()}
    folders = sorted(
        path.name
        for path in store.jobs_dir.iterdir()
        if path.is_dir() and not path.name.startswith(".")
    )
    for job_id in folders:
        record = records.get(job_id)
        job_dir = store.job_dir(job_id)
        if record is None:
            found.extend(_without_record(job_dir))
        else:
            found.extend(_compare(job_dir, record, thorough))
    for job_id, record in records.items():
        if job_id not in folders and record is not None:
            found.append(
                Disagreement(
                    job_id,
                    f"a {record.state.name} record with {record.last_sequence} events, and no "
                    f"folder {store.job_dir(job_id)} (its checkpoints, model and log are gone)",
                    Fix.RECREATE_FOLDER,
                )
            )
    return found


def _without_record(job_dir: Path) -> list[Disagreement]:
    job_id = job_dir.name
    if not journal.has_journal(job_dir):
        return [
            Disagreement(
                job_id, f"the folder {job_dir} has no record and no journal", Fix.SET_ASIDE
            )
        ]
    try:
        contents = journal.read_journal(job_dir)
    except journal.JournalDamaged as error:
        return [
            Disagreement(job_id, f"no record, and its journal is damaged: {error}", Fix.SET_ASIDE)
        ]
    if not contents.events:
        return [
            Disagreement(
                job_id, "a submission the store never took (no event)", Fix.DROP_UNFINISHED
            )
        ]
    return [
        Disagreement(
            job_id,
            f"no record; its journal holds {contents.last_sequence} events, {_state(contents)}",
            Fix.REBUILD_RECORD,
        )
    ]


def _agrees_at_tail(job_dir: Path, record: JobRecord) -> bool:
    """Whether the journal's end matches the record: the start-up check's quick path.

    The record is a prefix of the journal (written first), so it agrees when
    it holds the journal's last event and what the lines after it set.
    """
    try:
        tail = journal.read_tail(job_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if tail is None or tail.torn_tail or tail.last_sequence != record.last_sequence:
        return False
    values = {
        "checkpoint": (tail.checkpoint, record.checkpoint),
        "restarts": (tail.restarts, record.restarts),
        "preemptions": (tail.preemptions, record.preemptions),
    }
    return all(values[name][0] == values[name][1] for name in tail.set_after_last_event)


def _compare(job_dir: Path, record: JobRecord, thorough: bool) -> list[Disagreement]:
    job_id = record.job_id
    if not journal.has_journal(job_dir):
        return [Disagreement(job_id, "no journal (a job from before journals)", Fix.WRITE_JOURNAL)]
    if not thorough and _agrees_at_tail(job_dir, record):
        return []
    try:
        contents = journal.read_journal(job_dir)
    except journal.JournalDamaged as error:
        return [Disagreement(job_id, f"its journal is damaged: {error}", Fix.REPLACE_JOURNAL)]
    journal_at, record_at = contents.last_sequence, record.last_sequence
    if journal_at > record_at:
        return [
            Disagreement(
                job_id,
                f"the record holds {record_at} events ({record.state.name}), its journal "
                f"{journal_at} ({_state(contents)})",
                Fix.REBUILD_RECORD,
            )
        ]
    if journal_at < record_at:
        return [
            Disagreement(
                job_id,
                f"the journal holds {journal_at} events, the record {record_at}"
                + (" (its last line is torn)" if contents.torn_tail else ""),
                Fix.WRITE_JOURNAL,
            )
        ]
    # The same events: the lines that are not events were written journal first too.
    ahead = [
        name
        for name, mine, theirs in (
            ("checkpoint", contents.checkpoint, record.checkpoint),
            ("restarts", contents.restarts, record.restarts),
            ("preemptions", contents.preemptions, record.preemptions),
        )
        if mine != theirs
    ]
    if ahead:
        return [
            Disagreement(
                job_id,
                f"the record's {' and '.join(ahead)} differ from the journal's",
                Fix.REBUILD_RECORD,
            )
        ]
    if contents.torn_tail:
        return [Disagreement(job_id, "the journal's last line is torn", Fix.WRITE_JOURNAL)]
    return []


def _state(contents: journal.JournalContents) -> str:
    states = [event for event in contents.events if event.kind == "state"]
    if not states:
        return "no state"
    return str(json.loads(states[-1].data)["state"])


def repair(store: Store, found: list[Disagreement]) -> Store:
    """Make each repair; returns the store (a new one when the database was rebuilt)."""
    if any(item.fix is Fix.REBUILD_DATABASE for item in found):
        store.close()
        return rebuild_database(store.state_dir)
    # Records rebuilt in the order their jobs were created: ListJobs' order.
    order = sorted(found, key=lambda item: _create_time(store, item.job_id))
    for item in order:
        _fix(store, item)
    return store


def _create_time(store: Store, job_id: str) -> float:
    try:
        return float(journal.read_journal(store.job_dir(job_id)).job["create_time"])
    except (journal.JournalDamaged, KeyError, ValueError):
        return float("inf")


def _fix(store: Store, item: Disagreement) -> None:
    job_dir = store.job_dir(item.job_id)
    if item.fix is Fix.REBUILD_RECORD:
        record = store.rebuild_job(journal.read_journal(job_dir))
        log.warning(
            "job %s: rebuilt its record from its journal (%s, %d events): %s",
            item.job_id,
            record.state.name,
            record.last_sequence,
            item.problem,
        )
    elif item.fix in (Fix.WRITE_JOURNAL, Fix.REPLACE_JOURNAL, Fix.RECREATE_FOLDER):
        journal.rewrite(job_dir, *store.journal_of(item.job_id))
        log.warning("job %s: wrote its journal from its record: %s", item.job_id, item.problem)
    elif item.fix is Fix.DROP_UNFINISHED:
        for name in (journal.JOURNAL_FILE, journal.JOB_FILE):
            (job_dir / name).unlink(missing_ok=True)
        log.warning("job %s: removed a submission the store never took", item.job_id)
    elif item.fix is Fix.SET_ASIDE:
        target = store.state_dir / LOST_AND_FOUND / item.job_id
        target.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(job_dir, target)
        log.warning("job %s: moved its folder to %s: %s", item.job_id, target, item.problem)


def rebuild_database(state_dir: Path) -> Store:
    """Set ntrain.db (and its -wal, -shm) aside and build a new one from the journals."""
    aside = state_dir / f"ntrain.db.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in ("", "-wal", "-shm"):
        path = state_dir / f"ntrain.db{suffix}"
        if path.exists():
            os.replace(path, f"{aside}{suffix}")
    log.warning("set the damaged database aside as %s", aside)
    fresh = Store(state_dir)
    return repair(fresh, check(fresh))


def open_checked(state_dir: Path) -> Store:
    """The server's store, checked against the job folders and repaired when nothing is lost.

    Raises:
        StoreNeedsRepair: one line naming the first disagreement the server does
            not repair itself, how many there are, and the command that does.
    """
    store = open_store(state_dir)
    found = check(store, thorough=False)
    manual = [item for item in found if not item.fix.automatic]
    if manual:
        store.close()
        more = f" (and {len(manual) - 1} more: `ntrain store check --state-dir {state_dir}`)"
        raise StoreNeedsRepair(
            f"the store and the job folders disagree: {manual[0]}"
            f"{more if len(manual) > 1 else ''}; `{repair_command(state_dir)}` repairs it"
        )
    return repair(store, found)


def backup(state_dir: Path, to: Path) -> tuple[int, int]:
    """Copy the live database to `to` with SQLite's online backup; returns (jobs, bytes).

    Safe while a server writes: the copy is one consistent snapshot (WAL
    readers do not block the writer). It is written beside `to` and renamed,
    and is a plain (rollback-journal) database: copy it to `ntrain.db` in a
    state directory to restore it; the start-up check then rebuilds from the
    journals whatever is newer than the backup.
    """
    path = Path(state_dir) / "ntrain.db"
    if not path.is_file():
        raise FileNotFoundError(f"no job store at {path}")
    partial = to.with_name(f".{to.name}.partial")
    partial.unlink(missing_ok=True)
    source = sqlite3.connect(path)
    try:
        target = sqlite3.connect(partial)
        try:
            source.backup(target)  # every page in one step: one read transaction
            target.execute("PRAGMA journal_mode=DELETE")
            jobs = target.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        finally:
            target.close()
    finally:
        source.close()
    os.replace(partial, to)
    return jobs, to.stat().st_size
