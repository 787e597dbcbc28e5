"""Uploaded data sets: converted folders stored once by content, and names pointing at them.

    STATE_DIR/datasets/sha256-<digest>/   the canonical layout (naive_model.canonical)
    STATE_DIR/datasets/datasets.db        names -> digests, owners, push order (SQLite)
    STATE_DIR/datasets/.tmp/              uploads and conversions in progress

A version is the SHA-256 of the uploaded file's bytes. A folder enters
`sha256-<digest>/` by one rename, after it was converted in full, and its
name row is written after that; so whatever was killed half-way (a client
that went away, a full disk, the server itself) leaves only `.tmp/` files,
which the next start removes, or a folder no name points at, which it removes
too. A name points at versions: `NAME` means the one pushed last,
`NAME@sha256:<digest>` one exactly.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from naive_model.canonical import Manifest, read_manifest
from naive_model.config import shown
from naive_model.npz import DatasetError
from service.jobs.access import Action, Principal, authorize
from service.jobs.errors import FailedPrecondition, InvalidArgument, NotFound

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DIGEST_PATTERN = re.compile(r"[0-9a-f]{64}")
DIGEST_PREFIX = "@sha256:"
RESERVED_NAMES = ("mnist", "synthetic")  # the built-ins keep their meaning
_SCHEMA = """
CREATE TABLE IF NOT EXISTS dataset_versions (
    name TEXT NOT NULL,
    digest TEXT NOT NULL,                -- SHA-256 of the uploaded file, hex
    owner TEXT NOT NULL DEFAULT '',      -- who pushed it under this name; '' anonymous
    push_seq INTEGER NOT NULL,           -- the newest push of a name is its NAME
    create_time REAL NOT NULL,
    size_bytes INTEGER NOT NULL,         -- of the uploaded file
    PRIMARY KEY (name, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dataset_versions_by_digest ON dataset_versions (digest);
"""


@dataclass(frozen=True, kw_only=True)
class DatasetVersion:
    """One version of a named data set, and what its converted folder holds."""

    name: str
    digest: str  # hex, without "sha256:"
    owner: str
    create_time: float
    size_bytes: int
    folder: Path
    manifest: Manifest

    @property
    def reference(self) -> str:
        """`NAME@sha256:<digest>`: this version, whatever is pushed later."""
        return f"{self.name}{DIGEST_PREFIX}{self.digest}"


def is_reference(text: str) -> bool:
    """Whether `text` can only name an uploaded data set (it holds "@sha256:")."""
    return DIGEST_PREFIX in text


def parse_reference(reference: str, field: str = "dataset") -> tuple[str, str | None]:
    """`NAME` or `NAME@sha256:<digest>` as (name, digest or None).

    Raises:
        InvalidArgument: neither form.
    """
    name, _, digest = reference.partition(DIGEST_PREFIX)
    check_name(name, field)
    if is_reference(reference) and not DIGEST_PATTERN.fullmatch(digest):
        raise InvalidArgument(
            f"{field} must be NAME or NAME@sha256:<64 hex digits>, got {shown(reference)}",
            field=field,
        )
    return name, digest if is_reference(reference) else None


def check_name(name: str, field: str = "name") -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"{field} must be 1 to 64 letters, digits, '.', '_' or '-' starting with a letter "
            f"or digit, got {shown(name)}",
            field=field,
        )


class DatasetStore:
    """The data sets pushed to this server. Thread-safe; its lock is its own.

    Args:
        users_of: the jobs (ids) queued or running on a version, by digest;
            `delete` refuses a version that has any. The job manager owns
            that knowledge, so it is asked, not read here.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        users_of: Callable[[str], list[str]] = lambda digest: [],
        clock: Callable[[], float] = time.time,
    ):
        self.root = Path(state_dir) / "datasets"
        self.temp_dir = self.root / ".tmp"
        self.users_of = users_of
        self._clock = clock
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Nothing in .tmp survives a restart: it is an upload or a conversion
        # that was cut off (the state directory's lock says no other server
        # is using it).
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir.mkdir(mode=0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.root / "datasets.db", check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._collect_garbage()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def folder(self, digest: str) -> Path:
        return self.root / f"sha256-{digest}"

    def temp_path(self, kind: str) -> Path:
        """A fresh path in .tmp (removed at the next start if left behind)."""
        return self.temp_dir / f"{kind}-{uuid.uuid4().hex}"

    def stored_manifest(self, digest: str) -> Manifest | None:
        """The manifest of a version already converted, whatever its names; else None."""
        folder = self.folder(digest)
        try:
            return read_manifest(folder) if folder.is_dir() else None
        except DatasetError:
            return None

    def add(
        self, *, name: str, digest: str, owner: str, size_bytes: int, converted: Path | None
    ) -> DatasetVersion:
        """Point `name` at the version `digest`, moving its converted folder into place.

        Args:
            converted: the folder a conversion wrote, renamed into place (or
                removed, when the version is stored already); None when it is.
        """
        with self._lock:
            target = self.folder(digest)
            if converted is not None:
                if target.exists():
                    shutil.rmtree(converted, ignore_errors=True)
                else:
                    converted.rename(target)
            if not target.is_dir():
                raise NotFound(f"data set version sha256:{digest} is not stored")
            seq = self._db.execute(
                "SELECT COALESCE(MAX(push_seq), 0) + 1 FROM dataset_versions"
            ).fetchone()[0]
            # A push again moves the version to the top and shows when: as `ls` orders.
            self._db.execute(
                "INSERT INTO dataset_versions (name, digest, owner, push_seq, create_time, "
                "size_bytes) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name, digest) DO UPDATE "
                "SET push_seq = excluded.push_seq, create_time = excluded.create_time",
                (name, digest, owner, seq, self._clock(), size_bytes),
            )
            row = self._row(name, digest)
        assert row is not None
        return self._version(row)

    def resolve(self, reference: str, field: str = "dataset") -> DatasetVersion:
        """The version `NAME` (the newest) or `NAME@sha256:<digest>` names.

        Raises:
            InvalidArgument: not a reference.
            NotFound: no such name, or no such version of it.
        """
        name, digest = parse_reference(reference, field)
        with self._lock:
            row = self._row(name, digest)
        if row is None:
            what = f"data set {shown(name)}" if digest is None else f"data set {shown(reference)}"
            raise NotFound(f"{what} was not pushed to this server (ntrain data ls lists them)")
        return self._version(row)

    def pushers(self, digest: str) -> dict[str, int]:
        """Who pushed the bytes `digest` under some name, and the size each was pushed with."""
        with self._lock:
            rows = self._db.execute(
                "SELECT owner, size_bytes FROM dataset_versions WHERE digest = ?", (digest,)
            ).fetchall()
        return {row["owner"]: row["size_bytes"] for row in rows}

    def find(self, reference: str) -> DatasetVersion | None:
        """As `resolve`, None for a name nobody pushed."""
        try:
            return self.resolve(reference)
        except NotFound:
            return None

    def versions(self, name: str = "") -> list[DatasetVersion]:
        """Every version (of `name`, when given), newest push first."""
        if name:
            check_name(name)
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM dataset_versions WHERE ? = '' OR name = ? ORDER BY push_seq DESC",
                (name, name),
            ).fetchall()
        return [self._version(row) for row in rows]

    def delete(self, reference: str, *, principal: Principal) -> list[DatasetVersion]:
        """Remove `NAME@sha256:<digest>`, or with `NAME` every version of the name.

        A converted folder goes when no name points at it any more.

        Raises:
            NotFound: nothing by that name.
            PermissionDenied: a version is another's and the caller no admin.
            FailedPrecondition: a queued or running job uses a version; names it.
        """
        name, digest = parse_reference(reference)
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM dataset_versions WHERE name = ? AND (? IS NULL OR digest = ?) "
                "ORDER BY push_seq DESC",
                (name, digest, digest),
            ).fetchall()
        if not rows:
            raise NotFound(f"data set {shown(reference)} was not pushed to this server")
        for row in rows:
            authorize(principal, Action.DELETE_DATA, row["owner"], resource="data set")
        for row in rows:
            jobs = self.users_of(row["digest"])
            if jobs:
                raise FailedPrecondition(
                    f"data set {name}@sha256:{row['digest'][:12]}... is used by "
                    f"{'job' if len(jobs) == 1 else 'jobs'} {', '.join(jobs[:5])} "
                    "(queued or running); cancel or wait for it first"
                )
        versions = [self._version(row) for row in rows]
        with self._lock:
            for row in rows:
                self._db.execute(
                    "DELETE FROM dataset_versions WHERE name = ? AND digest = ?",
                    (row["name"], row["digest"]),
                )
                if not self._named(row["digest"]):
                    shutil.rmtree(self.folder(row["digest"]), ignore_errors=True)
        return versions

    def _row(self, name: str, digest: str | None) -> sqlite3.Row | None:
        return self._db.execute(
            "SELECT * FROM dataset_versions WHERE name = ? AND (? IS NULL OR digest = ?) "
            "ORDER BY push_seq DESC LIMIT 1",
            (name, digest, digest),
        ).fetchone()

    def _named(self, digest: str) -> bool:
        return bool(
            self._db.execute(
                "SELECT 1 FROM dataset_versions WHERE digest = ? LIMIT 1", (digest,)
            ).fetchone()
        )

    def _version(self, row: sqlite3.Row) -> DatasetVersion:
        folder = self.folder(row["digest"])
        return DatasetVersion(
            name=row["name"],
            digest=row["digest"],
            owner=row["owner"],
            create_time=row["create_time"],
            size_bytes=row["size_bytes"],
            folder=folder,
            manifest=read_manifest(folder),
        )

    def _collect_garbage(self) -> None:
        """Folders no name points at, and names of folders that are gone (a cut-off start)."""
        for folder in self.root.glob("sha256-*"):
            if not self._named(folder.name.removeprefix("sha256-")):
                shutil.rmtree(folder, ignore_errors=True)
        for row in self._db.execute("SELECT DISTINCT digest FROM dataset_versions").fetchall():
            if self.stored_manifest(row["digest"]) is None:
                self._db.execute("DELETE FROM dataset_versions WHERE digest = ?", (row["digest"],))
