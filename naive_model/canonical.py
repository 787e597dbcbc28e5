"""The one on-disk layout every data set is converted to: .npy files and a manifest.

    FOLDER/manifest.json   sizes, dtypes and where the data came from
    FOLDER/x_train.npy     (num_train, input_size) uint8 or float32, row-major
    FOLDER/y_train.npy     (num_train,) int64
    FOLDER/x_test.npy      (num_test, input_size)
    FOLDER/y_test.npy      (num_test,) int64

Training, Evaluate and Predict read it without parsing: each array is
memory-mapped (`numpy.load(mmap_mode="r")`), so a reader pays only for the
rows it touches. `NpyWriter` appends rows to an .npy whose length is not
known in advance, so a converter holds one block in memory, never the file.
numpy only.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from naive_model.npz import DatasetError

MANIFEST = "manifest.json"
LAYOUT_VERSION = 1
ARRAYS = ("x_train", "y_train", "x_test", "y_test")
FEATURE_DTYPES = ("uint8", "float32")
# An .npy header written before the row count is known, padded to this size,
# and rewritten in place once it is (a multiple of 64, as numpy aligns them).
_HEADER_BYTES = 256


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a converted data set holds, and how it was made from its source.

    test_fraction: the share of rows drawn into the test split with
        `split_seed`; None when the source brought its own test split.
    """

    input_size: int
    num_classes: int
    num_train: int
    num_test: int
    feature_dtype: str  # "uint8" (pixels, scaled by 1/255 when trained on) or "float32"
    source_format: str  # npz, npy, csv or parquet
    label_column: str = ""  # csv and parquet
    test_fraction: float | None = None
    split_seed: int = 0
    layout_version: int = LAYOUT_VERSION

    @property
    def feature_bytes(self) -> int:
        return np.dtype(self.feature_dtype).itemsize

    @property
    def stored_bytes(self) -> int:
        rows = self.num_train + self.num_test
        return rows * (self.input_size * self.feature_bytes + 8)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(asdict(manifest), indent=1) + "\n")


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """The manifest of a converted data set.

    Raises:
        DatasetError: no manifest, or one this version cannot read.
    """
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
        manifest = Manifest(**data)
    except (OSError, ValueError, TypeError) as error:
        raise DatasetError(f"{folder}: no readable {MANIFEST}: {error}") from None
    if manifest.layout_version != LAYOUT_VERSION or manifest.feature_dtype not in FEATURE_DTYPES:
        raise DatasetError(
            f"{folder}: layout {manifest.layout_version} with {manifest.feature_dtype} features "
            f"is not read here (layout {LAYOUT_VERSION}, {' or '.join(FEATURE_DTYPES)})"
        )
    return manifest


def is_canonical(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def open_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's (features, labels), memory-mapped read-only: nothing is read yet.

    Raises:
        DatasetError: an array is missing or does not match the manifest.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    rows = manifest.num_train if split == "train" else manifest.num_test
    try:
        x = np.load(folder / f"x_{split}.npy", mmap_mode="r", allow_pickle=False)
        y = np.load(folder / f"y_{split}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DatasetError(f"{folder}: the {split} split cannot be read: {error}") from None
    if x.shape != (rows, manifest.input_size) or x.dtype != np.dtype(manifest.feature_dtype):
        raise DatasetError(f"{folder}: x_{split} is {x.shape} {x.dtype}, not as its manifest says")
    if y.shape != (rows,) or y.dtype != np.int64:
        raise DatasetError(f"{folder}: y_{split} is {y.shape} {y.dtype}, not ({rows},) int64")
    return x, y


class NpyWriter:
    """Append rows to an .npy file whose row count is known only at the end.

    The header is written padded to a fixed size and rewritten in place by
    `close`, so the file is a valid .npy (and memory-mappable) once closed.
    """

    def __init__(self, path: Path, dtype: np.dtype | str, row_shape: tuple[int, ...]):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(b"\0" * _HEADER_BYTES)

    def append(self, block: np.ndarray) -> None:
        """Add rows, (rows, *row_shape), converted to the writer's dtype."""
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {block.shape[1:]}, expected {self.row_shape}")
        self._file.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += len(block)

    def close(self) -> None:
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.rows, *self.row_shape),
        }
        text = repr(header).encode("latin1")
        # magic (6) + version (2) + length (2) + dict, padded with spaces, ending "\n".
        padding = _HEADER_BYTES - 10 - len(text) - 1
        if padding < 0:
            raise ValueError(f"an .npy header of {len(text)} bytes does not fit")
        self._file.seek(0)
        self._file.write(np.lib.format.magic(1, 0))
        self._file.write((_HEADER_BYTES - 10).to_bytes(2, "little"))
        self._file.write(text + b" " * padding + b"\n")
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def split_rows(num_rows: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a seeded split: (train, test), each ascending.

    The test split has round(num_rows * test_fraction) rows, at least one,
    and leaves at least one for training.

    Raises:
        DatasetError: fewer than two rows.
    """
    if num_rows < 2:
        raise DatasetError(f"a data set needs at least 2 rows to split, got {num_rows}")
    count = min(max(1, round(num_rows * test_fraction)), num_rows - 1)
    order = np.random.default_rng(seed).permutation(num_rows)
    return np.sort(order[count:]), np.sort(order[:count])


def gather_rows(source: np.ndarray, rows: np.ndarray, writer: NpyWriter, block: int) -> None:
    """Write source[rows] through `writer`, `block` rows at a time."""
    for start in range(0, len(rows), block):
        writer.append(source[rows[start : start + block]])


def block_rows(input_size: int, itemsize: int, budget_bytes: int = 16 * 2**20) -> int:
    """Rows of `input_size` features that fit in `budget_bytes`: a converter's block."""
    return max(1, budget_bytes // max(1, input_size * itemsize))

