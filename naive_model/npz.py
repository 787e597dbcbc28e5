""".npz data sets checked from their headers, before a byte of their arrays is loaded.

An .npz is a zip of .npy files; each .npy starts with a header declaring its
shape and dtype. Reading those headers (numpy's own `read_magic` and
`read_array_header_*`) tells how much memory loading would take and whether
the file holds what it declares, so a header claiming (10**11, 784) is
refused in a millisecond instead of failing to allocate 285 TiB. numpy only.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from naive_model.config import shown

SPLITS = ("x_train", "y_train", "x_test", "y_test")  # the arrays a data set .npz holds
# A data set is refused before loading when holding it (its arrays as stored
# plus their float32 and int32 forms) would take more than this share of the
# host's memory: the model, its optimizer and TensorFlow need the rest.
DATASET_MEMORY_SHARE = 0.5


class DatasetError(ValueError):
    """A data set that cannot be used as it is; the message names the problem.

    `where` names the place in the data, as a field path: an array
    ("x_train", "y_test[17]"), a row and column of a table ("rows[41].pixel3"),
    or "file" for the file as a whole; "" when no one place is at fault.
    """

    def __init__(self, message: str, *, where: str = "") -> None:
        super().__init__(message)
        self.where = where


@dataclass(frozen=True)
class ArrayHeader:
    """What an .npy header inside an .npz declares, and how many bytes follow it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    stored_bytes: int

    @property
    def declared_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npz_headers(
    path: str | os.PathLike, keys: Sequence[str] | None = None
) -> dict[str, ArrayHeader]:
    """The shape and dtype of arrays in an .npz, read from their headers alone.

    Nothing is allocated for the data: each member's .npy header is parsed
    (`numpy.lib.format.read_magic`, `read_array_header_1_0`/`_2_0`) and the
    member's size is taken from the zip directory.

    Args:
        keys: the arrays to read (those the file has); None reads every one.

    Raises:
        DatasetError: not a zip archive, or a member with no valid .npy header.
    """
    path = Path(path)
    headers = {}
    with reading(path, "an array header is not valid"):
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                key = member.filename.removesuffix(".npy")
                if key == member.filename or (keys is not None and key not in keys):
                    continue
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
                    else:
                        raise DatasetError(
                            f"{path.name}: {shown(key)} is in .npy format {version}, "
                            "which is not read here (1.0 and 2.0 are)"
                        )
                    header_bytes = stream.tell()
                headers[key] = ArrayHeader(
                    tuple(shape), np.dtype(dtype), member.file_size - header_bytes
                )
    return headers


@contextlib.contextmanager
def reading(path: Path, problem: str) -> Iterator[None]:
    """Turn what reading a broken or hostile .npz raises into a DatasetError."""
    try:
        yield
    except DatasetError:
        raise
    except zipfile.BadZipFile as error:
        raise DatasetError(f"{path.name} is not a valid .npz (zip) archive: {error}") from None
    # zlib.error: a corrupt compressed member; RuntimeError: an encrypted one;
    # NotImplementedError: a compression method zipfile lacks.
    except (ValueError, EOFError, zlib.error, RuntimeError, NotImplementedError) as error:
        raise DatasetError(f"{path.name}: {problem}: {error}") from None


def check_npz(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict[str, ArrayHeader]:
    """Check an .npz data set from its headers alone, before anything is loaded.

    Checks that the four splits are there with numeric images and 1-D integer
    labels of matching lengths, that each array holds as many bytes as its
    header declares, and that loading fits in `max_bytes`.

    Args:
        max_bytes: the most loading may take; None means `DATASET_MEMORY_SHARE`
            of this host's memory (no bound where the host does not say).

    Returns:
        The headers of the four splits.

    Raises:
        DatasetError: naming the first problem.
    """
    path = Path(path)
    headers = read_npz_headers(path, SPLITS)
    missing = [key for key in SPLITS if key not in headers]
    if missing:
        with zipfile.ZipFile(path) as archive:
            names = sorted(name.removesuffix(".npy") for name in archive.namelist())
        raise DatasetError(
            f"{path}: missing arrays {', '.join(missing)} (has {shown(names, limit=200)})"
        )
    for key in SPLITS:
        header = headers[key]
        if header.dtype.hasobject or not (
            np.issubdtype(header.dtype, np.integer) or np.issubdtype(header.dtype, np.floating)
        ):
            raise DatasetError(f"{path.name}: {key} must hold numbers, got dtype {header.dtype}")
        if any(size < 0 for size in header.shape) or not header.shape or not header.shape[0]:
            raise DatasetError(f"{path.name}: {key} is empty (shape {header.shape})")
        if header.declared_bytes != header.stored_bytes:
            raise DatasetError(
                f"{path.name}: {key} declares shape {_shape(header.shape)} of {header.dtype} "
                f"({_size(header.declared_bytes)}) but holds {_size(header.stored_bytes)}"
            )
    for split in ("train", "test"):
        x, y = headers[f"x_{split}"], headers[f"y_{split}"]
        if not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(
                f"{path.name}: y_{split} must hold integer class labels, got {y.dtype}"
            )
        if len(y.shape) != 1:
            raise DatasetError(
                f"{path.name}: y_{split} must be one label per example, got shape {y.shape}"
            )
        if x.shape[0] != y.shape[0]:
            raise DatasetError(
                f"{path.name}: x_{split} has {x.shape[0]} examples but y_{split} has "
                f"{y.shape[0]} labels"
            )
    train_features = math.prod(headers["x_train"].shape[1:])
    test_features = math.prod(headers["x_test"].shape[1:])
    if train_features != test_features:
        raise DatasetError(
            f"{path.name}: x_train has {train_features} features per example, "
            f"x_test {test_features}"
        )
    if max_bytes is None:
        max_bytes = int(DATASET_MEMORY_SHARE * host_memory_bytes()) or None
    needed = loading_bytes(headers)
    if max_bytes is not None and needed > max_bytes:
        raise DatasetError(
            f"{path.name}: x_train of shape {_shape(headers['x_train'].shape)} needs about "
            f"{_size(needed)} to load, more than the {_size(max_bytes)} allowed"
        )
    return {key: headers[key] for key in SPLITS}


def loading_bytes(headers: dict[str, ArrayHeader]) -> int:
    """Memory that loading takes: the arrays as stored, the float32 images, int32 labels."""
    stored = sum(headers[key].declared_bytes for key in SPLITS)
    images = sum(4 * math.prod(headers[key].shape) for key in ("x_train", "x_test"))
    labels = sum(4 * headers[key].shape[0] for key in ("y_train", "y_test"))
    return stored + images + labels


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def host_memory_bytes(cgroup_root: Path | None = None, proc_self_cgroup: Path | None = None) -> int:
    """The memory this process's host gives it: physical, or its container's limit if lower.

    A container under a memory limit is OOM-killed at the limit whatever the
    host has, so the limit is the memory to plan with. 0 where the platform
    says neither.
    """
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = 0
    limit = cgroup_memory_limit(cgroup_root, proc_self_cgroup)
    if limit is not None and (physical == 0 or limit < physical):
        return limit
    return physical


def cgroup_memory_limit(
    cgroup_root: Path | None = None, proc_self_cgroup: Path | None = None
) -> int | None:
    """The lowest memory limit on this process's cgroup and its ancestors; None if none.

    cgroup v2 keeps it in `memory.max` ("max" for none), v1 in the memory
    controller's `memory.limit_in_bytes` (a huge number for none). A
    container usually sees its own cgroup at the root of /sys/fs/cgroup; on a
    host the process's cgroup is the path /proc/self/cgroup names, and every
    ancestor's limit applies too.
    """
    cgroup_root = CGROUP_ROOT if cgroup_root is None else cgroup_root
    proc_self_cgroup = PROC_SELF_CGROUP if proc_self_cgroup is None else proc_self_cgroup
    paths = {"": ""}  # controller ("" for v2) -> the process's cgroup path
    try:
        for line in proc_self_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path.strip("/")
    except (OSError, ValueError):
        pass
    candidates = [(cgroup_root, paths[""], "memory.max")]
    candidates.append((cgroup_root / "memory", paths.get("memory", ""), "memory.limit_in_bytes"))
    limits = []
    for base, relative, name in candidates:
        folder = base / relative if relative else base
        while True:
            limits.append(_read_limit(folder / name))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit here


def _shape(shape: tuple[int, ...]) -> str:
    return shown(shape, limit=60)


def _size(count: int) -> str:
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
