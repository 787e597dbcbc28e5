"""Receiving a data set: header checks, chunks to disk as they come, digest, conversion.

The server holds one chunk of an upload at a time: each is hashed and
written to a file in the store's `.tmp/` as it arrives, so its memory does
not grow with the file. The file is converted in a worker process
(`service.processes.conversion_process`), and the store renames the result
into place. Whatever ends an upload early (bad data, a client gone, a full
disk) removes its temporary files before the answer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from naive_model.config import shown
from naive_model.formats import FORMATS
from service.jobs.access import ADMIN, Action, Principal, authorize
from service.jobs.dataset_store import (
    DIGEST_PATTERN,
    RESERVED_NAMES,
    DatasetStore,
    DatasetVersion,
    check_name,
)
from service.jobs.errors import AlreadyExists, InvalidArgument, ResourceExhausted, WorkerError
from service.processes.conversion_process import convert_in_worker
from service.protocol import ConversionFailed, Converted, ConvertTask

DEFAULT_MAX_DATASET_BYTES = 8 * 2**30
# Room an upload needs on the disk: the file, and the converted arrays (at most
# the file's size again for every format but a compressed npz) with a margin.
DISK_ROOM_FACTOR = 3
TABLE_FORMATS = ("csv", "parquet")


@dataclass(frozen=True, kw_only=True)
class UploadHeader:
    """The first message of an upload, as the API received it."""

    name: str
    size_bytes: int
    sha256: str
    format: str
    label_column: str = ""
    test_fraction: float | None = None
    num_classes: int = 0


def check_header(header: UploadHeader, max_bytes: int) -> None:
    """Raises InvalidArgument naming the header's first bad field."""
    check_name(header.name, "header.name")
    if header.name in RESERVED_NAMES:
        raise InvalidArgument(
            f"header.name {header.name!r} is a built-in data set's; choose another",
            field="header.name",
        )
    if header.size_bytes <= 0:
        raise InvalidArgument(
            f"header.size_bytes must be the file's size, got {header.size_bytes} (the file is "
            "empty)",
            field="header.size_bytes",
        )
    if header.size_bytes > max_bytes:
        raise InvalidArgument(
            f"header.size_bytes is {header.size_bytes}: more than the {max_bytes} bytes this "
            "server takes (its --max-dataset-bytes)",
            field="header.size_bytes",
        )
    if not DIGEST_PATTERN.fullmatch(header.sha256):
        raise InvalidArgument(
            f"header.sha256 must be the file's SHA-256 as 64 lowercase hex digits, got "
            f"{shown(header.sha256)}",
            field="header.sha256",
        )
    if header.format not in FORMATS:
        raise InvalidArgument(
            f"header.format must be one of {', '.join(FORMATS)}, got {shown(header.format)}",
            field="header.format",
        )
    if header.format in TABLE_FORMATS and not header.label_column:
        raise InvalidArgument(
            f"header.label_column must name the label column of a {header.format} file",
            field="header.label_column",
        )
    if header.format not in TABLE_FORMATS and header.label_column:
        raise InvalidArgument(
            f"header.label_column is for csv and parquet files, not {header.format}",
            field="header.label_column",
        )
    fraction = header.test_fraction
    if fraction is not None and not 0 < fraction < 1:
        raise InvalidArgument(
            f"header.test_fraction must be between 0 and 1, got {fraction!r}",
            field="header.test_fraction",
        )
    if not 0 <= header.num_classes <= 100_000:
        raise InvalidArgument(
            f"header.num_classes must be 0 or at most 100000, got {header.num_classes}",
            field="header.num_classes",
        )


class DatasetUploads:
    """Turns an upload into a stored version.

    Args:
        convert: runs a conversion (a worker process; tests may run it here).
        max_bytes: the largest file accepted (the server's --max-dataset-bytes).
    """

    def __init__(
        self,
        store: DatasetStore,
        *,
        convert: Callable[[ConvertTask], Converted | ConversionFailed] = convert_in_worker,
        max_bytes: int = DEFAULT_MAX_DATASET_BYTES,
    ):
        self.store = store
        self.convert = convert
        self.max_bytes = max_bytes

    def upload(
        self, header: UploadHeader, chunks: Iterator[bytes], *, principal: Principal
    ) -> DatasetVersion:
        """Receive, check, convert and store one file.

        Raises:
            InvalidArgument: a bad header, bytes that do not match it, or bad
                data (the field names the place).
            AlreadyExists: these bytes are stored with other conversion options.
            ResourceExhausted: no room on the server's disk.
            PermissionDenied: the caller may not push data sets.
        """
        authorize(principal, Action.PUSH_DATA)
        check_header(header, self.max_bytes)
        stored = self.store.stored_manifest(header.sha256)
        pushers = self.store.pushers(header.sha256) if stored is not None else {}
        if stored is not None and pushers:  # these bytes are stored already
            self._check_same_options(header, stored)
            size = next(iter(pushers.values()))
            if header.size_bytes != size:
                raise InvalidArgument(
                    f"header.size_bytes is {header.size_bytes}, but the bytes with that SHA-256 "
                    f"are {size} bytes long",
                    field="header.size_bytes",
                )
            # A digest is no proof of having the bytes: one who pushed them before (or an
            # admin) names them at once; anyone else sends them, and they are checked.
            if principal.name in pushers or principal.role == ADMIN:
                return self._add(header, principal, converted=None)
            self._receive(header, chunks, None)
            return self._add(header, principal, converted=None)
        free = shutil.disk_usage(self.store.temp_dir).free
        if free < DISK_ROOM_FACTOR * header.size_bytes:
            raise ResourceExhausted(
                f"the server has {free} bytes free on its disk; a {header.size_bytes}-byte "
                f"upload needs about {DISK_ROOM_FACTOR}x that"
            )
        source = self.store.temp_path("upload")
        folder = self.store.temp_path("convert")
        try:
            self._receive(header, chunks, source)
            answer = self.convert(
                ConvertTask(
                    source=source,
                    folder=folder,
                    format=header.format,
                    label_column=header.label_column,
                    test_fraction=header.test_fraction,
                    num_classes=header.num_classes,
                )
            )
            source.unlink()
            if isinstance(answer, ConversionFailed):
                raise _conversion_error(answer)
            return self._add(header, principal, converted=folder)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(
                    "the server's disk filled up during the upload; nothing of it was kept"
                ) from None
            raise
        finally:
            source.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)

    def _receive(self, header: UploadHeader, chunks: Iterator[bytes], path: Path | None) -> None:
        """Check the chunks against the header's size and digest, writing them to `path`.

        With no path they are only checked (bytes the server holds already).
        """
        digest = hashlib.sha256()
        size = 0
        with open(path or os.devnull, "wb") as file:
            for chunk in chunks:
                size += len(chunk)
                if size > header.size_bytes:
                    raise InvalidArgument(
                        f"header.size_bytes is {header.size_bytes} but more bytes came",
                        field="header.size_bytes",
                    )
                digest.update(chunk)
                file.write(chunk)
        if size != header.size_bytes:
            raise InvalidArgument(
                f"header.size_bytes is {header.size_bytes} but {size} bytes came (the upload "
                "ended early)",
                field="header.size_bytes",
            )
        if digest.hexdigest() != header.sha256:
            raise InvalidArgument(
                f"header.sha256 is {header.sha256} but the bytes that came hash to "
                f"{digest.hexdigest()}",
                field="header.sha256",
            )

    def _check_same_options(self, header: UploadHeader, stored) -> None:
        fraction = header.test_fraction
        same = (
            stored.source_format == header.format
            and stored.label_column == header.label_column
            and (fraction is None or stored.test_fraction in (None, fraction))
            and header.num_classes in (0, stored.num_classes)
        )
        if not same:
            raise AlreadyExists(
                f"these bytes (sha256:{header.sha256[:12]}...) are stored already as "
                f"{stored.source_format} with label column {stored.label_column!r}, test "
                f"fraction {stored.test_fraction} and {stored.num_classes} classes; push them "
                "with those options, or delete every version of them first"
            )

    def _add(self, header: UploadHeader, principal: Principal, *, converted: Path | None):
        return self.store.add(
            name=header.name,
            digest=header.sha256,
            owner=principal.name,
            size_bytes=header.size_bytes,
            converted=converted,
        )


def _conversion_error(answer: ConversionFailed) -> Exception:
    if answer.kind == "data":
        if answer.where == "label_column":
            field = "header.label_column"
        elif answer.where in ("", "file"):
            field = "file"
        else:
            field = f"file.{answer.where}"
        return InvalidArgument(answer.message, field=field)
    if answer.kind == "disk_full":
        return ResourceExhausted(
            f"the server's disk filled up converting the upload ({answer.message})"
        )
    return WorkerError(f"converting the upload failed: {answer.message}")
