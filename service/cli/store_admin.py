"""`ntrain store check | repair | backup`: the operator's tools for a state directory.

They work on the directory itself, not through a server: `check` and
`backup` are safe while a server runs; `repair` refuses then (the server's
lock, `service.jobs.lock`, says whether one holds the directory).
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from pathlib import Path

from service.cli.exit_status import EXIT_ERROR, EXIT_OK, CliError


def add_store_parser(subcommands) -> None:
    """Add `store` and its three actions to the command line's subcommands."""
    store = subcommands.add_parser(
        "store", help="check, repair or back up a state directory's job store"
    )
    actions = store.add_subparsers(dest="store_command", metavar="ACTION")
    actions.required = True
    check = actions.add_parser(
        "check",
        help="list every disagreement between the store and the job folders (exit 1 if any)",
        description="Compares ntrain.db with each job folder's journal (job.json, "
        "journal.jsonl): a folder without a record, a record without a folder, a record "
        "behind or ahead of its journal, a damaged journal or database. Each line says what "
        "`ntrain store repair` would do. Safe while a server runs, though an event written "
        "during the check may show as a disagreement of one event.",
    )
    repair = actions.add_parser(
        "repair",
        help="rebuild the store from the job folders' journals (the server must be stopped)",
        description="Makes every repair `ntrain store check` lists: records rebuilt from "
        "journals, journals written from records, folders no journal explains moved to "
        "STATE_DIR/lost+found/, a damaged ntrain.db set aside (ntrain.db.damaged-TIME) and "
        "rebuilt. Refuses while a server holds the directory.",
    )
    backup = actions.add_parser(
        "backup",
        help="copy the job store to a file with SQLite's online backup (safe while serving)",
        description="A consistent snapshot of ntrain.db, taken without stopping the server. "
        "To restore: stop the server, copy FILE to STATE_DIR/ntrain.db (removing "
        "ntrain.db-wal and ntrain.db-shm); the start-up check rebuilds from the job "
        "folders' journals whatever is newer than the backup.",
    )
    backup.add_argument("--to", metavar="FILE", required=True, help="the backup file to write")
    for action, run in (
        (check, cmd_store_check),
        (repair, cmd_store_repair),
        (backup, cmd_store_backup),
    ):
        action.add_argument(
            "--state-dir",
            metavar="DIR",
            default="var",
            help="the server's state directory (default ./var)",
        )
        action.set_defaults(run=run)


def _state_dir(args) -> Path:
    state_dir = Path(args.state_dir)
    if not (state_dir / "ntrain.db").is_file() and not (state_dir / "jobs").is_dir():
        raise CliError(f"{state_dir} is not a state directory (no ntrain.db, no jobs/)")
    return state_dir


def cmd_store_check(args) -> int:
    from service.jobs.reconcile import StoreNeedsRepair, check, open_store

    state_dir = _state_dir(args)
    try:
        store = open_store(state_dir)
    except StoreNeedsRepair as error:
        print(error)
        return EXIT_ERROR
    try:
        found = check(store)
        jobs = len(store.job_ids())
    finally:
        store.close()
    for item in found:
        print(item)
    if found:
        automatic = sum(item.fix.automatic for item in found)
        print(
            f"{len(found)} disagreements ({automatic} the server repairs itself at start); "
            f"`ntrain store repair --state-dir {state_dir}` repairs them all"
        )
        return EXIT_ERROR
    print(f"the store's {jobs} jobs and their folders agree")
    return EXIT_OK


def cmd_store_repair(args) -> int:
    from service.jobs.lock import StateDirInUse, StateDirLock
    from service.jobs.reconcile import (
        StoreNeedsRepair,
        check,
        open_store,
        rebuild_database,
        repair,
    )

    state_dir = _state_dir(args)
    lock = StateDirLock(state_dir)
    try:
        lock.acquire(orphan_wait=0.0)
    except StateDirInUse as error:
        raise CliError(f"{error}: stop it before `ntrain store repair`") from None
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        try:
            store = open_store(state_dir)
            found = check(store)
        except StoreNeedsRepair as error:
            print(error)
            store = rebuild_database(state_dir)
            found = []
        store = repair(store, found)
        left = check(store)
        jobs = len(store.job_ids())
        store.close()
    finally:
        lock.release()
    for item in left:
        print(f"still: {item}")
    print(f"repaired {len(found)} disagreements; the store holds {jobs} jobs")
    return EXIT_ERROR if left else EXIT_OK


def cmd_store_backup(args) -> int:
    from service.jobs.reconcile import backup

    state_dir = _state_dir(args)
    target = Path(args.to)
    try:
        jobs, size = backup(state_dir, target)
    except (OSError, sqlite3.Error) as error:
        raise CliError(f"cannot back up {state_dir / 'ntrain.db'} to {target}: {error}") from None
    print(f"backed up {jobs} jobs to {target} ({size:,} bytes)")
    return EXIT_OK
