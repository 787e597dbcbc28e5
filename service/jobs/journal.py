"""Each job's journal in its folder: enough to rebuild its record if the store loses it.

The store (SQLite) is the index the server reads; the journal is written
first, so that a store that loses its newest pages (a deleted or torn
`ntrain.db-wal`, a 0-byte `ntrain.db`) can be rebuilt from the job folders.
A job folder `state-dir/jobs/<job_id>/` holds:

    job.json       written once, atomically, when the job is created:
                   {"format": 1, "job_id", "owner", "request_id", "create_time", "spec"}
    journal.jsonl  one JSON object a line, appended in the order the store saw them:
                   {"seq": 3, "time": 12.5, "kind": "state", "data": {...payload...},
                    "strategy": "mirrored", "devices": ["GPU:0"], "failure_reason": ""}
                   (the last three only when the change set them), and
                   {"checkpoint": {...CheckpointSaved...}}, {"restarts": 2},
                   {"preemptions": 1}: the latest value, not an increment.

Durability: each line is one write() on a descriptor opened with O_APPEND and
no fsync, like SQLite's synchronous=NORMAL: a killed server process (kill -9)
loses nothing, since the kernel already holds the line; an OS crash may lose
the last lines, or leave the last one torn, which `read_journal` drops and
reports. job.json is fsynced (file and folder) once, as it is written once and
without it nothing of the job can be rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.protocol import CheckpointSaved

JOB_FILE = "job.json"
JOURNAL_FILE = "journal.jsonl"
FORMAT = 1


class JournalDamaged(ValueError):
    """A job's journal cannot be read: the message names the file and the place."""


@dataclass(frozen=True)
class JournalEvent:
    sequence: int
    time: float
    kind: str  # the store's kind column: state, progress, epoch_end, result
    data: str  # JSON of the payload, as the store keeps it
    columns: dict[str, Any]  # strategy, devices, failure_reason when the event set them


@dataclass
class JournalContents:
    """What a job's folder says about it."""

    job: dict[str, Any]  # job.json
    events: list[JournalEvent]
    checkpoint: CheckpointSaved | None = None
    restarts: int = 0
    preemptions: int = 0
    torn_tail: bool = False  # the last line was cut short (an OS crash) and is left out
    # What the lines after the last event set (checkpoint, restarts, preemptions).
    set_after_last_event: set[str] = dataclasses.field(default_factory=set)

    @property
    def last_sequence(self) -> int:
        return self.events[-1].sequence if self.events else 0


def write_job_file(job_dir: Path, job: dict[str, Any]) -> None:
    """Write job.json atomically and durably (the folder is created 0700 if missing)."""
    job_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = job_dir / f".{JOB_FILE}.partial"
    with open(partial, "w") as file:
        json.dump({"format": FORMAT, **job}, file, sort_keys=True)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, job_dir / JOB_FILE)
    _fsync_dir(job_dir)


def event_line(
    sequence: int, time: float, kind: str, data: str, columns: dict[str, Any]
) -> dict[str, Any]:
    return {"seq": sequence, "time": time, "kind": kind, "data": json.loads(data), **columns}


def checkpoint_line(checkpoint: CheckpointSaved) -> dict[str, Any]:
    return {"checkpoint": dataclasses.asdict(checkpoint)}


def append(job_dir: Path, line: dict[str, Any]) -> int:
    """Append one line to the job's journal; returns the file's size before it.

    The size lets the caller cut the line off again (`truncate`) when the
    store then refuses the write, so the journal never holds what the store
    does not.
    """
    text = json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n"
    fd = os.open(job_dir / JOURNAL_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return size


def truncate(job_dir: Path, size: int) -> None:
    os.truncate(job_dir / JOURNAL_FILE, size)


def rewrite(job_dir: Path, job: dict[str, Any], lines: list[dict[str, Any]]) -> None:
    """Replace the job's files with these (a rebuild from its record): atomic, fsynced."""
    write_job_file(job_dir, job)
    partial = job_dir / f".{JOURNAL_FILE}.partial"
    with open(partial, "w") as file:
        for line in lines:
            file.write(json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, job_dir / JOURNAL_FILE)
    _fsync_dir(job_dir)


def has_journal(job_dir: Path) -> bool:
    return (job_dir / JOB_FILE).is_file()


def read_journal(job_dir: Path) -> JournalContents:
    """The job's journal, checked: sequences from 1 without gaps, every line whole.

    Raises:
        JournalDamaged: job.json is missing or unreadable, or a line other than
            the last is not a journal line.
    """
    job_file = job_dir / JOB_FILE
    try:
        job = json.loads(job_file.read_text())
    except FileNotFoundError:
        raise JournalDamaged(f"{job_file} is missing") from None
    except (OSError, ValueError) as error:
        raise JournalDamaged(f"{job_file} cannot be read: {error}") from None
    if not isinstance(job, dict) or job.get("format") != FORMAT:
        raise JournalDamaged(f"{job_file} is not a job file of format {FORMAT}")
    contents = JournalContents(job=job, events=[])
    path = job_dir / JOURNAL_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = b""
    lines = raw.split(b"\n")
    if lines[-1]:  # no newline at the end: the last write was cut short
        contents.torn_tail = True
    lines = lines[:-1]
    for number, text in enumerate(lines, start=1):
        try:
            line = json.loads(text)
            _apply(contents, line)
        except (ValueError, KeyError, TypeError) as error:
            raise JournalDamaged(f"{path} line {number} is damaged: {error}") from None
        if contents.events and contents.events[-1].sequence != len(contents.events):
            raise JournalDamaged(
                f"{path} line {number}: event {contents.events[-1].sequence} "
                f"follows event {len(contents.events) - 1}"
            )
    return contents


TAIL_BYTES = 65536


def read_tail(job_dir: Path) -> JournalContents | None:
    """The journal's end, read from its last 64 KiB: enough to compare it with a record.

    The store is a prefix of the journal (every write goes to the journal
    first), so they agree when the store holds the journal's last event and
    the value of any line after it. Returns contents holding the last event
    and, in `checkpoint`, `restarts` or `preemptions`, only what the lines
    after that event set (the rest left at their defaults); None when the
    tail holds no whole event line (read the whole journal instead).
    """
    job = json.loads((job_dir / JOB_FILE).read_text())
    path = job_dir / JOURNAL_FILE
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - TAIL_BYTES))
            raw = file.read()
    except FileNotFoundError:
        return None
    lines = raw.split(b"\n")
    torn = bool(lines[-1])
    lines = lines[1 if size > TAIL_BYTES else 0 : -1]  # the first may be cut by the window
    parsed = []
    for text in reversed(lines):
        parsed.append(json.loads(text))
        if "seq" in parsed[-1]:
            contents = JournalContents(job=job, events=[], torn_tail=torn)
            for line in reversed(parsed):
                _apply(contents, line)
            return contents
    return None


def _apply(contents: JournalContents, line: dict[str, Any]) -> None:
    names = {"checkpoint", "restarts", "preemptions"} & set(line)
    contents.set_after_last_event = contents.set_after_last_event | names if names else set()
    if "seq" in line:
        columns: dict[str, Any] = {
            key: line[key] for key in ("strategy", "devices", "failure_reason") if key in line
        }
        contents.events.append(
            JournalEvent(
                sequence=int(line["seq"]),
                time=float(line["time"]),
                kind=str(line["kind"]),
                data=json.dumps(line["data"]),
                columns=columns,
            )
        )
    elif "checkpoint" in line:
        contents.checkpoint = CheckpointSaved(**line["checkpoint"])
    elif "restarts" in line:
        contents.restarts = int(line["restarts"])
    elif "preemptions" in line:
        contents.preemptions = int(line["preemptions"])
    else:
        raise ValueError(f"not a journal line: {sorted(line)}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
