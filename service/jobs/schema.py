"""The SQLite schema of the job store, and the migrations from its earlier versions.

Version 4 added `job_labels`; a version 3 database gains the (empty) table when
SCHEMA runs on it, since no job had labels before: nothing else changes.
Version 5 added `jobs.preemptions` (ADD_PREEMPTIONS; 0 for every older job).
The index `events_state_changes` came later without a new version: SCHEMA
creates it on an older file, and an older server ignores it.
"""

from __future__ import annotations

SCHEMA_VERSION = 5
# Versions a server of this schema opens (and migrates to SCHEMA_VERSION); 0 is a new file.
OPENS_VERSIONS = (0, 1, 3, 4, SCHEMA_VERSION)
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order: ListJobs pages by it
    job_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL DEFAULT '',         -- the principal that submitted it; '' anonymous
    request_id TEXT NOT NULL,               -- unique per owner: jobs_by_request_id
    spec TEXT NOT NULL,                     -- JSON of the normalized JobSpec
    state TEXT NOT NULL,
    create_time REAL NOT NULL,
    strategy TEXT NOT NULL DEFAULT '',
    devices TEXT NOT NULL DEFAULT '[]',
    failure_reason TEXT NOT NULL DEFAULT '',
    progress TEXT,                          -- JSON of the latest progress event
    result TEXT,                            -- JSON of the result event
    last_sequence INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,    -- restarts after the worker died
    checkpoint TEXT,                        -- JSON of the latest CheckpointSaved
    preemptions INTEGER NOT NULL DEFAULT 0  -- stops to make room for more urgent jobs
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_request_id ON jobs (owner, request_id);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL REFERENCES jobs (job_id),
    sequence INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,                     -- state, progress, epoch_end or result
    data TEXT NOT NULL,                     -- JSON of the payload dataclass of `kind`
    PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
-- A job's state changes, for its record's transitions: without it, reading a
-- record scans every progress event of the job (7.6 ms at 100,000 events).
CREATE INDEX IF NOT EXISTS events_state_changes ON events (job_id, sequence)
    WHERE kind = 'state';
-- A job's labels (also in its spec), one row each, for ListJobs' label filter.
CREATE TABLE IF NOT EXISTS job_labels (
    job_id TEXT NOT NULL REFERENCES jobs (job_id),
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (job_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_labels_by_label ON job_labels (key, value);
"""
# Version 1 had no owner, restarts or checkpoint, and request_id UNIQUE over
# all jobs. SQLite cannot drop a column's UNIQUE constraint, so the table is
# rebuilt (SQLite's documented way: foreign keys off, copy, drop, rename,
# check). Every job keeps its seq, so the order of ListJobs and its page
# tokens stay as they were; old jobs are unowned. (Version 2 was never
# released: this server migrates from 1 only.)
MIGRATE_1 = """
CREATE TABLE jobs_new (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL DEFAULT '',
    request_id TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    create_time REAL NOT NULL,
    strategy TEXT NOT NULL DEFAULT '',
    devices TEXT NOT NULL DEFAULT '[]',
    failure_reason TEXT NOT NULL DEFAULT '',
    progress TEXT,
    result TEXT,
    last_sequence INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    checkpoint TEXT
);
INSERT INTO jobs_new (seq, job_id, owner, request_id, spec, state, create_time, strategy,
                      devices, failure_reason, progress, result, last_sequence)
    SELECT seq, job_id, '', request_id, spec, state, create_time, strategy,
           devices, failure_reason, progress, result, last_sequence FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
"""
# Versions 1 to 4 had no preemptions column.
ADD_PREEMPTIONS = "ALTER TABLE jobs ADD COLUMN preemptions INTEGER NOT NULL DEFAULT 0"
