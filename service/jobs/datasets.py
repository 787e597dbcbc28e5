"""Sizes of the data sets jobs name, looked up without TensorFlow and cached.

A name is a built-in ("mnist", "synthetic"), a data set pushed with
UploadDataset ("NAME", its newest version, or "NAME@sha256:<digest>"), or a
file in the server's data directory, looked for in that order.

Validating a job needs its data set's input size, class count and split
sizes. Reading an .npz's labels takes a fraction of a second, so the answer
is cached per file identity (path, mtime, size): a resubmission, or the next
job on the same file, does not pay it again, and a replaced file is read anew.
"""

from __future__ import annotations

import functools
import zipfile
from dataclasses import dataclass
from pathlib import Path

from naive_model.config import shown
from naive_model.data import (
    DatasetInfo,
    DatasetNotFoundError,
    canonical_info,
    dataset_file_identity,
    dataset_info,
    find_mnist,
    is_plain_file_name,
)
from service.jobs.dataset_store import NAME_PATTERN, DatasetStore, DatasetVersion, is_reference
from service.jobs.errors import InvalidArgument

BUILTIN_DATASETS = ("mnist", "synthetic")
MAX_DATASET_NAME = 255  # a file name's limit on Linux file systems
# MNIST's shape, known without the file: the worker may still download it.
MNIST_INFO = DatasetInfo(
    name="mnist", input_size=784, num_classes=10, num_train=60000, num_test=10000
)


def check_dataset_name(name: str, field: str = "dataset") -> None:
    """A built-in name or a plain file name: never a path."""
    if not name:
        raise InvalidArgument(
            f"{field} must name a data set (mnist, synthetic, or a file in the server's "
            "data directory), got ''"
        )
    if len(name) > MAX_DATASET_NAME:
        raise InvalidArgument(
            f"{field} must be at most {MAX_DATASET_NAME} characters, got {shown(name)}"
        )
    if not is_plain_file_name(name):
        raise InvalidArgument(
            f"{field} must be a plain file name inside the server's data directory, "
            f"got {shown(name)}"
        )


@dataclass(frozen=True)
class ResolvedDataset:
    """What a data set name means now: its sizes and, for a pushed one, its version.

    A job records `version.reference` (its digest) so that it, and a rerun of
    it, trains on exactly these bytes whatever is pushed under the name later;
    its worker reads `version.folder`.
    """

    info: DatasetInfo
    version: DatasetVersion | None = None  # None: a built-in or a data_dir file


def resolve_dataset(
    name: str,
    data_dir: Path | None,
    field: str = "dataset",
    *,
    datasets: DatasetStore | None = None,
) -> ResolvedDataset:
    """The data set a name means: a built-in, a pushed version, or a data_dir file.

    Raises:
        InvalidArgument: a bad name, a file that is missing or not a data set,
            a pushed name or version that is not stored.
    """
    check_dataset_name(name, field)
    if name not in BUILTIN_DATASETS and (datasets is not None or is_reference(name)):
        version = None
        if datasets is not None and (is_reference(name) or NAME_PATTERN.fullmatch(name)):
            version = datasets.find(name)
        if version is not None:
            return ResolvedDataset(canonical_info(version.folder, name=name), version)
        if is_reference(name):
            where = "" if datasets is not None else " (this server stores no pushed data sets)"
            # A finished job names the version it trained on, which may have been deleted since.
            raise InvalidArgument(
                f"{field}: data set {shown(name)} is not on this server (never pushed, or "
                f"deleted){where}"
            )
    return ResolvedDataset(lookup_file_dataset(name, data_dir, field))


def lookup_dataset(
    name: str,
    data_dir: Path | None,
    field: str = "dataset",
    *,
    datasets: DatasetStore | None = None,
) -> DatasetInfo:
    """Sizes of a named data set, without loading TensorFlow (see `resolve_dataset`).

    Raises:
        InvalidArgument: a bad name, a file that is missing or not a data set.
    """
    return resolve_dataset(name, data_dir, field, datasets=datasets).info


def lookup_file_dataset(name: str, data_dir: Path | None, field: str = "dataset") -> DatasetInfo:
    """Sizes of a built-in data set or a file in data_dir."""
    check_dataset_name(name, field)
    if name == "mnist" and find_mnist(data_dir=data_dir) is None:
        return MNIST_INFO  # the worker downloads it, or fails the job saying where it looked
    try:
        return _cached_info(name, data_dir, dataset_file_identity(name, data_dir))
    except DatasetNotFoundError as error:
        raise InvalidArgument(f"{field}: {error}") from None
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise InvalidArgument(f"{field} {shown(name)} is not a usable data set: {error}") from None


@functools.lru_cache(maxsize=64)
def _cached_info(name: str, data_dir: Path | None, identity: tuple) -> DatasetInfo:
    del identity  # part of the cache key only
    return dataset_info(name, data_dir=data_dir)
