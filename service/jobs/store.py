"""Jobs, their state transitions and their event history in SQLite.

One database, `state-dir/ntrain.db` (WAL), and one folder per job,
`state-dir/jobs/<job_id>/`, for its checkpoints, SavedModel and log, and its
journal (`service.jobs.journal`): every write goes to the journal first and
then to the database, so the database can be rebuilt from the folders
(`service.jobs.reconcile`). Every
event a job emits (state change, progress, end of epoch, result) is a row with
a per-job sequence number that starts at 1 and has no gaps; WatchJob replays
those rows, and the job's transitions are its state-change events. The job row
keeps the latest state, progress and result so that GetJob and ListJobs need
one query.

Records hold the protocol's typed objects (`JobSpec`, `Progress`, ...); an
event's payload is stored as the JSON of its dataclass under the name of its
kind. Proto conversion happens in `service.api.convert`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.jobs import journal
from service.jobs.errors import ResourceExhausted, Unavailable
from service.jobs.schema import (
    ADD_PREEMPTIONS,
    MIGRATE_1,
    OPENS_VERSIONS,
    SCHEMA,
    SCHEMA_VERSION,
)
from service.protocol import (
    TERMINAL_STATES,
    CheckpointSaved,
    EpochEnd,
    JobEventPayload,
    JobFiles,
    JobSpec,
    JobState,
    Progress,
    StateChange,
    TrainingResult,
)

# The name each payload type is stored under (the `kind` column).
EVENT_KINDS: dict[type, str] = {
    StateChange: "state",
    Progress: "progress",
    EpochEnd: "epoch_end",
    TrainingResult: "result",
}
_PAYLOAD_TYPES = {kind: cls for cls, kind in EVENT_KINDS.items()}


def encode_payload(payload: JobEventPayload) -> tuple[str, str]:
    """(kind, JSON) of an event payload."""
    kind = EVENT_KINDS.get(type(payload))
    if kind is None:
        raise TypeError(
            f"a job event payload must be one of {list(_PAYLOAD_TYPES)}, got {payload!r}"
        )
    fields = dataclasses.asdict(payload)
    if isinstance(payload, StateChange):
        fields["state"] = payload.state.name  # stored by name, as the jobs table's column
    return kind, json.dumps(fields)


def decode_payload(kind: str, data: str) -> JobEventPayload:
    fields = json.loads(data)
    if kind == "state":
        fields["state"] = JobState[fields["state"]]
    return _PAYLOAD_TYPES[kind](**fields)


@dataclass(frozen=True)
class Event:
    """One entry of a job's history."""

    job_id: str
    sequence: int
    time: float
    payload: JobEventPayload


@dataclass(frozen=True)
class Transition:
    state: JobState
    time: float
    reason: str = ""


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    request_id: str  # the owner's idempotency key
    spec: JobSpec
    state: JobState
    create_time: float
    strategy: str = ""
    devices: tuple[str, ...] = ()
    failure_reason: str = ""
    progress: Progress | None = None
    result: TrainingResult | None = None
    last_sequence: int = 0
    transitions: tuple[Transition, ...] = field(default=())
    restarts: int = 0
    checkpoint: CheckpointSaved | None = None  # the latest one
    owner: str = ""  # the principal that submitted it; "" anonymous
    preemptions: int = 0  # stops to make room for a job of higher priority

    @property
    def finished(self) -> bool:
        return self.state.finished


class Store:
    """SQLite storage for jobs and events, safe to use from many threads.

    `in_memory` keeps the database in memory (job folders stay under
    `state_dir`) and writes no journal, since there is nothing durable to
    rebuild: the control loop's tests run on it in milliseconds.
    """

    def __init__(self, state_dir: str | Path, *, in_memory: bool = False):
        self.journaled = not in_memory
        self.state_dir = Path(state_dir)
        self.jobs_dir = self.state_dir / "jobs"
        # Jobs' models, logs and request_ids are their owners' business: the
        # state directory is this user's alone (0700), whatever made it before.
        self.jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for directory in (self.state_dir, self.jobs_dir):
            if directory.stat().st_uid == os.getuid():
                directory.chmod(0o700)
        self.path = self.state_dir / "ntrain.db"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            ":memory:" if in_memory else self.path, check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        with self._lock:
            # Refuse a database from a newer server before writing anything to it.
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in OPENS_VERSIONS:
                self._db.close()
                raise RuntimeError(
                    f"{self.path} has schema version {version}; this server knows {SCHEMA_VERSION}"
                )
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL with NORMAL sync survives a process crash; only an OS crash may
            # lose the last transactions, which is acceptable for progress rows.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            if version == 1:
                self._migrate_from_1()
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if columns and "preemptions" not in columns:  # versions 1 to 4
                self._db.execute(ADD_PREEMPTIONS)
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate_from_1(self) -> None:
        self._db.execute("PRAGMA foreign_keys=OFF")  # must be outside a transaction
        try:
            self._db.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATE_1}\nPRAGMA user_version={SCHEMA_VERSION};"
            )
            if self._db.execute("PRAGMA foreign_key_check").fetchall():
                self._db.execute("ROLLBACK")
                raise RuntimeError(
                    f"{self.path}: migrating from version 1 left events without a job"
                )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        finally:
            self._db.execute("PRAGMA foreign_keys=ON")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def job_dir(self, job_id: str) -> Path:
        """The folder of a job's checkpoints, SavedModel and log (not created here)."""
        return self.jobs_dir / job_id

    def job_files(self, job_id: str) -> JobFiles:
        return JobFiles(self.job_dir(job_id))

    def exported_model(self, job_id: str) -> Path | None:
        """The job's SavedModel folder once it was exported, else None."""
        files = self.job_files(job_id)
        return files.model if files.has_model() else None

    # -- writes: the job's journal first, then the database --------------------

    def create_job(self, record: JobRecord, time: float) -> Event:
        """Insert a new job with its first event, the change to `record.state`."""
        payload = StateChange(state=record.state)
        kind, data = encode_payload(payload)
        job_dir = self.job_dir(record.job_id)
        with self._lock, self._writing(job_dir):
            if self.journaled:
                journal.write_job_file(job_dir, job_file_fields(record))
                journal.append(job_dir, journal.event_line(1, time, kind, data, {}))
            try:
                with self._transaction():
                    self._insert_job(record, state=record.state.name, last_sequence=1)
                    self._insert_event(record.job_id, 1, time, kind, data)
            except BaseException:
                if self.journaled:  # the store refused it: nor does the folder hold it
                    for name in (journal.JOURNAL_FILE, journal.JOB_FILE):
                        (job_dir / name).unlink(missing_ok=True)
                raise
        return Event(record.job_id, 1, time, payload)

    def append_event(
        self,
        job_id: str,
        payload: JobEventPayload,
        time: float,
        *,
        strategy: str | None = None,
        devices: tuple[str, ...] | None = None,
        failure_reason: str | None = None,
    ) -> Event:
        """Add the job's next event and update its row, in one transaction.

        A state change sets the job's state; a progress or result event also
        becomes the job's latest progress or result. The keyword arguments set
        the job's other columns when given.
        """
        kind, data = encode_payload(payload)
        columns: dict[str, Any] = {}
        if strategy is not None:
            columns["strategy"] = strategy
        if devices is not None:
            columns["devices"] = list(devices)
        if failure_reason is not None:
            columns["failure_reason"] = failure_reason
        job_dir = self.job_dir(job_id)
        with self._lock, self._writing(job_dir):
            # The lock orders every write: no other can take this sequence meanwhile.
            row = self._db.execute(
                "SELECT last_sequence FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise KeyError(job_id)
            sequence = row["last_sequence"] + 1
            line = journal.event_line(sequence, time, kind, data, columns)
            with self._journaled(job_dir, line), self._transaction():
                self._apply_event(job_id, sequence, time, kind, data, columns)
        return Event(job_id, sequence, time, payload)

    def _apply_event(
        self, job_id: str, sequence: int, time: float, kind: str, data: str, columns: dict
    ) -> None:
        """Insert an event and set the job's columns it changes (inside a transaction)."""
        self._insert_event(job_id, sequence, time, kind, data)
        updates: dict[str, Any] = {"last_sequence": sequence}
        if kind == "state":
            updates["state"] = json.loads(data)["state"]
        elif kind in ("progress", "result"):
            updates[kind] = data
        for column, value in columns.items():
            updates[column] = json.dumps(value) if column == "devices" else value
        assignments = ", ".join(f"{column} = ?" for column in updates)
        self._db.execute(
            f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*updates.values(), job_id)
        )

    def record_checkpoint(self, job_id: str, checkpoint: CheckpointSaved) -> None:
        """Remember the job's latest checkpoint (not an event: watchers are not told)."""
        job_dir = self.job_dir(job_id)
        line = journal.checkpoint_line(checkpoint)
        with self._lock, self._writing(job_dir):
            with self._journaled(job_dir, line), self._transaction():
                self._db.execute(
                    "UPDATE jobs SET checkpoint = ? WHERE job_id = ?",
                    (json.dumps(dataclasses.asdict(checkpoint)), job_id),
                )

    def count_preemption(self, job_id: str) -> int:
        """Add one to the job's preemptions; returns the new count."""
        return self._count(job_id, "preemptions")

    def count_restart(self, job_id: str) -> int:
        """Add one to the job's restarts; returns the new count."""
        return self._count(job_id, "restarts")

    def _count(self, job_id: str, column: str) -> int:
        job_dir = self.job_dir(job_id)
        with self._lock, self._writing(job_dir):
            row = self._db.execute(f"SELECT {column} FROM jobs WHERE job_id = ?", (job_id,))
            found = row.fetchone()
            if found is None:
                raise KeyError(job_id)
            count = found[0] + 1
            # The journal keeps the new value, not "+1": a line read twice does no harm.
            with self._journaled(job_dir, {column: count}), self._transaction():
                self._db.execute(f"UPDATE jobs SET {column} = ? WHERE job_id = ?", (count, job_id))
            return count

    @contextlib.contextmanager
    def _journaled(self, job_dir: Path, line: dict[str, Any]) -> Iterator[None]:
        """Append `line` to the job's journal; cut it off again if the database write fails."""
        if not self.journaled:
            yield
            return
        if not journal.has_journal(job_dir):  # a job from before journals (or its folder lost)
            journal.rewrite(job_dir, *self._journal_of(job_dir.name))
        size = journal.append(job_dir, line)
        try:
            yield
        except BaseException:
            journal.truncate(job_dir, size)
            raise

    def _insert_job(self, record: JobRecord, *, state: str, last_sequence: int) -> None:
        self._db.execute(
            "INSERT INTO jobs (job_id, owner, request_id, spec, state, create_time,"
            " last_sequence) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record.job_id,
                record.owner,
                record.request_id,
                json.dumps(record.spec.to_dict(), sort_keys=True),
                state,
                record.create_time,
                last_sequence,
            ),
        )
        self._db.executemany(
            "INSERT INTO job_labels (job_id, key, value) VALUES (?, ?, ?)",
            [(record.job_id, key, value) for key, value in record.spec.labels],
        )

    def _insert_event(self, job_id: str, sequence: int, time: float, kind: str, data: str) -> None:
        self._db.execute(
            "INSERT INTO events (job_id, sequence, time, kind, data) VALUES (?, ?, ?, ?, ?)",
            (job_id, sequence, time, kind, data),
        )

    def _transaction(self):
        return _Transaction(self._db)

    @contextlib.contextmanager
    def _writing(self, job_dir: Path) -> Iterator[None]:
        """Database and journal write errors as the service's: one line naming the file."""
        try:
            yield
        except sqlite3.OperationalError as error:
            if "full" in str(error):
                raise ResourceExhausted(
                    f"the state directory {self.state_dir} is full: {error}"
                ) from error
            raise Unavailable(f"cannot write the job store {self.path}: {error}") from error
        except OSError as error:  # the journal's
            where = error.filename or job_dir
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    f"the state directory is full: cannot write {where}"
                ) from error
            raise Unavailable(f"cannot write the job journal {where}: {error.strerror}") from error

    # -- rebuilding: service.jobs.reconcile's ------------------------------------

    def journal_of(self, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The job file and journal lines that its record holds (to write them anew)."""
        with self._lock:
            return self._journal_of(job_id)

    def _journal_of(self, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        events = self._db.execute(
            "SELECT * FROM events WHERE job_id = ? ORDER BY sequence", (job_id,)
        ).fetchall()
        record = self._record(row)
        lines = [
            journal.event_line(event["sequence"], event["time"], event["kind"], event["data"], {})
            for event in events
        ]
        # The columns a state change set are known only as their latest values:
        # they go on the last state change, which is what a rebuild reads them from.
        states = [line for line in lines if line["kind"] == "state"]
        if states:
            states[-1].update(
                strategy=record.strategy,
                devices=list(record.devices),
                failure_reason=record.failure_reason,
            )
        if record.checkpoint is not None:
            lines.append(journal.checkpoint_line(record.checkpoint))
        lines += [{"restarts": record.restarts}, {"preemptions": record.preemptions}]
        return job_file_fields(record), lines

    def rebuild_job(self, contents: journal.JournalContents) -> JobRecord:
        """Replace the job's record and history with what its journal holds."""
        job = contents.job
        spec = JobSpec.from_dict(job["spec"])
        record = JobRecord(
            job_id=job["job_id"],
            request_id=job["request_id"],
            spec=spec,
            state=JobState.QUEUED,
            create_time=job["create_time"],
            owner=job["owner"],
        )
        with self._lock, self._writing(self.job_dir(record.job_id)), self._transaction():
            for table in ("events", "job_labels", "jobs"):
                self._db.execute(f"DELETE FROM {table} WHERE job_id = ?", (record.job_id,))
            self._insert_job(record, state=JobState.QUEUED.name, last_sequence=0)
            for event in contents.events:
                self._apply_event(
                    record.job_id, event.sequence, event.time, event.kind, event.data, event.columns
                )
            self._db.execute(
                "UPDATE jobs SET checkpoint = ?, restarts = ?, preemptions = ? WHERE job_id = ?",
                (
                    json.dumps(dataclasses.asdict(contents.checkpoint))
                    if contents.checkpoint
                    else None,
                    contents.restarts,
                    contents.preemptions,
                    record.job_id,
                ),
            )
        rebuilt = self.get_job(record.job_id)
        assert rebuilt is not None
        return rebuilt

    def integrity_problem(self) -> str:
        """SQLite's quick_check: "" when the database file is sound, else its first finding."""
        with self._lock:
            rows = self._db.execute("PRAGMA quick_check(1)").fetchall()
        return "" if rows and rows[0][0] == "ok" else "; ".join(str(row[0]) for row in rows)

    def job_ids(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT job_id FROM jobs ORDER BY seq")]

    # -- reads ----------------------------------------------------------------

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return None if row is None else self._record(row)

    def find_by_request_id(self, owner: str, request_id: str) -> JobRecord | None:
        """The job `owner` submitted under `request_id`: each owner has its own keys."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE owner = ? AND request_id = ?", (owner, request_id)
            ).fetchone()
            return None if row is None else self._record(row)

    def list_jobs(
        self,
        *,
        states: tuple[JobState, ...] = (),
        labels: tuple[tuple[str, str], ...] = (),
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        """Jobs newest first, `limit` at most, created before cursor `before`.

        Only jobs in one of `states` (when given) carrying every one of `labels`.

        Returns:
            The jobs and the cursor of the next page (None on the last page).
        """
        where: list[str] = []
        params: list[Any] = []
        if states:
            # A long repeated list is a handful of states.
            distinct = sorted({state.name for state in states})
            where.append(f"state IN ({', '.join('?' for _ in distinct)})")
            params.extend(distinct)
        for key, value in labels:
            where.append("job_id IN (SELECT job_id FROM job_labels WHERE key = ? AND value = ?)")
            params.extend((key, value))
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs {clause} ORDER BY seq DESC LIMIT ?", (*params, limit + 1)
            ).fetchall()
            records = self._records(rows[:limit])
        next_cursor = rows[limit - 1]["seq"] if len(rows) > limit else None
        return records, next_cursor

    def events_after(self, job_id: str, after: int, limit: int = 1000) -> list[Event]:
        """The job's events with sequence > `after`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?",
                (job_id, after, limit),
            ).fetchall()
        return [
            Event(
                row["job_id"],
                row["sequence"],
                row["time"],
                decode_payload(row["kind"], row["data"]),
            )
            for row in rows
        ]

    def count_by_state(self) -> dict[JobState, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in JobState} | {JobState[row[0]]: row[1] for row in rows}

    def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs not in a terminal state, oldest first."""
        terminal = tuple(state.name for state in TERMINAL_STATES)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs WHERE state NOT IN ({', '.join('?' for _ in terminal)})"
                " ORDER BY seq",
                terminal,
            ).fetchall()
            return self._records(rows)

    def _record(self, row: sqlite3.Row) -> JobRecord:
        return self._records([row])[0]

    def _records(self, rows: list[sqlite3.Row]) -> list[JobRecord]:
        """Records of job rows, their transitions read in one query for all of them."""
        transitions: dict[str, list[Transition]] = {row["job_id"]: [] for row in rows}
        if rows:
            marks = ", ".join("?" for _ in transitions)
            for event in self._db.execute(
                "SELECT job_id, time, data FROM events INDEXED BY events_state_changes"
                " WHERE kind = 'state'"
                f" AND job_id IN ({marks}) ORDER BY job_id, sequence",
                tuple(transitions),
            ):
                data = json.loads(event["data"])
                transitions[event["job_id"]].append(
                    Transition(JobState[data["state"]], event["time"], data.get("reason", ""))
                )
        return [
            JobRecord(
                job_id=row["job_id"],
                request_id=row["request_id"],
                spec=JobSpec.from_dict(json.loads(row["spec"])),
                state=JobState[row["state"]],
                create_time=row["create_time"],
                strategy=row["strategy"],
                devices=tuple(json.loads(row["devices"])),
                failure_reason=row["failure_reason"],
                progress=Progress(**json.loads(row["progress"])) if row["progress"] else None,
                result=TrainingResult(**json.loads(row["result"])) if row["result"] else None,
                last_sequence=row["last_sequence"],
                transitions=tuple(transitions[row["job_id"]]),
                restarts=row["restarts"],
                checkpoint=(
                    CheckpointSaved(**json.loads(row["checkpoint"])) if row["checkpoint"] else None
                ),
                owner=row["owner"],
                preemptions=row["preemptions"],
            )
            for row in rows
        ]


def job_file_fields(record: JobRecord) -> dict[str, Any]:
    """What a job's job.json holds: the parts of its record no event changes."""
    return {
        "job_id": record.job_id,
        "owner": record.owner,
        "request_id": record.request_id,
        "create_time": record.create_time,
        "spec": record.spec.to_dict(),
    }


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
