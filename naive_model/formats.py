"""Data sets as people keep them, checked and converted once into the canonical layout.

Four formats, read a block of rows at a time (a converter holds one block,
never the file):

    npz       Keras's layout: x_train, y_train, x_test, y_test (or x, y)
    npy       .npy arrays one after another in one file (`np.save` twice to one
              handle): x, y; or x_train, y_train, x_test, y_test
    csv       a header row, numeric feature columns, an integer label column
    parquet   the same columns (pyarrow)

Every problem is a `DatasetError` whose `where` names the array, the row or
the column at fault. Without a test split in the source, a seeded share of
the rows becomes one. numpy, and pyarrow for csv and parquet (imported there).

    manifest = convert(Path("iris.csv"), Path("out"), ConvertOptions(format="csv",
                       label_column="species"))
"""

from __future__ import annotations

import contextlib
import csv
import math
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from naive_model.canonical import (
    Manifest,
    NpyWriter,
    block_rows,
    gather_rows,
    split_rows,
    write_manifest,
)
from naive_model.config import shown
from naive_model.npz import DatasetError

FORMATS = ("npz", "npy", "csv", "parquet")
DEFAULT_TEST_FRACTION = 0.1
MAX_CLASSES = 100_000  # a label past this is a mistake, not a class
_TRAIN, _TEST, _ALL = "train", "test", "all"
Blocks = Iterator[tuple[np.ndarray, np.ndarray]]  # (rows, input_size) features, (rows,) labels


@dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """How to read a source file.

    label_column: csv and parquet: the column of integer class labels.
    test_fraction: the share of rows drawn (seeded) into the test split when
        the source has none; None means 0.1. A source's own test split is kept.
    num_classes: labels must be in [0, num_classes); 0 means the largest
        label plus one.
    """

    format: str
    label_column: str = ""
    test_fraction: float | None = None
    num_classes: int = 0
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        fraction = self.test_fraction
        if fraction is not None and not (isinstance(fraction, float) and 0 < fraction < 1):
            raise ValueError(f"test_fraction must be between 0 and 1, got {fraction!r}")
        if not 0 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(
                f"num_classes must be 0 or at most {MAX_CLASSES}, got {self.num_classes!r}"
            )


CSV_FIRST_LINE = 2  # a CSV's row 0 is the line below its header


@dataclass(frozen=True)
class _Places:
    """How a source names its places in errors: arrays by index, tables by row and column."""

    features: str  # "x_train", or "rows" for a table
    labels: str
    columns: tuple[str, ...] = ()  # a table's feature columns
    label_column: str = ""
    first_line: int = 0  # a text file's line of row 0 (a CSV's 2, below its header); 0: none

    def feature(self, row: int, column: int) -> str:
        if self.columns:
            return f"rows[{row}].{self.columns[column]}"
        return f"{self.features}[{row}][{column}]"

    def label(self, row: int) -> str:
        return f"rows[{row}].{self.label_column}" if self.columns else f"{self.labels}[{row}]"

    def line(self, row: int) -> str:
        """The row's line in a text file, as ' (line N)' for an editor to find; else ''."""
        return f" (line {row + self.first_line})" if self.first_line else ""


@dataclass(frozen=True)
class _Split:
    places: _Places
    blocks: Callable[[], Blocks]


@dataclass(frozen=True)
class _Source:
    input_size: int
    feature_dtype: str  # uint8 or float32
    splits: dict[str, _Split]  # "all", or "train" and "test"


def convert(source: Path, folder: Path, options: ConvertOptions) -> Manifest:
    """Check `source` and write it into a new `folder` in the canonical layout.

    Raises:
        DatasetError: the first problem, its `where` naming the place; the
            folder is removed again.
    """
    folder = Path(folder)
    folder.mkdir(parents=True)
    try:
        return _convert(Path(source), folder, options)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _convert(source: Path, folder: Path, options: ConvertOptions) -> Manifest:
    try:
        size = source.stat().st_size
    except OSError as error:
        raise DatasetError(f"the file cannot be read: {error}", where="file") from None
    if size == 0:
        raise DatasetError("the file is empty", where="file")
    opened = _READERS[options.format](source, options)
    max_label = -1
    fraction = None
    if _ALL in opened.splits:
        fraction = options.test_fraction or DEFAULT_TEST_FRACTION
        rows, max_label = _write_split(opened, opened.splits[_ALL], folder, "all", options)
        train, test = split_rows(rows, fraction, options.split_seed)
        x = np.load(folder / "x_all.npy", mmap_mode="r")
        y = np.load(folder / "y_all.npy", mmap_mode="r")
        block = block_rows(opened.input_size, x.dtype.itemsize)
        for split, indices in ((_TRAIN, train), (_TEST, test)):
            for key, array in ((f"x_{split}", x), (f"y_{split}", y)):
                writer = NpyWriter(folder / f"{key}.npy", array.dtype, array.shape[1:])
                gather_rows(array, indices, writer, block)
                writer.close()
        del x, y
        (folder / "x_all.npy").unlink()
        (folder / "y_all.npy").unlink()
        num_train, num_test = len(train), len(test)
    else:
        num_train, top_train = _write_split(
            opened, opened.splits[_TRAIN], folder, _TRAIN, options
        )
        num_test, top_test = _write_split(opened, opened.splits[_TEST], folder, _TEST, options)
        max_label = max(top_train, top_test)
    manifest = Manifest(
        input_size=opened.input_size,
        num_classes=options.num_classes or max_label + 1,
        num_train=num_train,
        num_test=num_test,
        feature_dtype=opened.feature_dtype,
        source_format=options.format,
        label_column=options.label_column,
        test_fraction=fraction,
        split_seed=options.split_seed,
    )
    write_manifest(folder, manifest)
    return manifest


def _write_split(
    source: _Source, split: _Split, folder: Path, name: str, options: ConvertOptions
) -> tuple[int, int]:
    """Check and write one split's blocks; returns its rows and its largest label."""
    x = NpyWriter(folder / f"x_{name}.npy", source.feature_dtype, (source.input_size,))
    y = NpyWriter(folder / f"y_{name}.npy", np.dtype(np.int64), ())
    max_label = -1
    for features, labels in split.blocks():
        first = x.rows
        _check_features(features, first, split.places)
        checked = _check_labels(labels, first, split.places, options.num_classes)
        x.append(features)
        y.append(checked)
        max_label = max(max_label, int(checked.max(initial=-1)))
    x.close()
    y.close()
    if x.rows == 0:
        raise DatasetError(f"{split.places.features} holds no rows", where=split.places.features)
    return x.rows, max_label


def _check_features(block: np.ndarray, first: int, places: _Places) -> None:
    if block.dtype.kind != "f":
        return
    finite = np.isfinite(block.astype(np.float32, copy=False))
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        where = places.feature(first + int(row), int(column))
        raise DatasetError(
            f"{where}{places.line(first + int(row))} is {block[row, column].item()!r}: "
            "features must be finite float32 numbers (no NaN or infinity)",
            where=where,
        )


def _check_labels(block: np.ndarray, first: int, places: _Places, num_classes: int) -> np.ndarray:
    """The labels as int64, each an integer in [0, num_classes)."""
    if block.dtype.kind == "f":
        integral = np.isfinite(block) & (block == np.round(block))
        if not integral.all():
            row = int(np.argmin(integral))
            where = places.label(first + row)
            raise DatasetError(
                f"{where}{places.line(first + row)} is {block[row].item()!r}: a label must be "
                "an integer class number",
                where=where,
            )
    elif block.dtype.kind not in "iub":
        raise DatasetError(
            f"{places.labels} holds {block.dtype}, not integer class labels", where=places.labels
        )
    labels = block.astype(np.int64)
    top = num_classes or MAX_CLASSES
    bad = (labels < 0) | (labels >= top)
    if bad.any():
        row = int(np.argmax(bad))
        where = places.label(first + row)
        if labels[row] < 0:
            rule = "a label must be a class number, 0 or more"
        elif num_classes:
            rule = f"a label must be in [0, {top}) for {num_classes} classes"
        else:
            rule = f"a label must be below {top}, the most classes allowed"
        raise DatasetError(
            f"{where}{places.line(first + row)} is {labels[row]}: {rule}", where=where
        )
    return labels


def _feature_dtype(dtype: np.dtype) -> str:
    """uint8 stays uint8 (pixels); every other number becomes float32."""
    return "uint8" if dtype == np.uint8 else "float32"


def _numeric(dtype: np.dtype) -> bool:
    return not dtype.hasobject and dtype.kind in "iufb"


# -- arrays: npz and npy ------------------------------------------------------------


class _Rows(Protocol):
    """A stream of an array's bytes, from its first row."""

    def read(self, size: int = -1, /) -> bytes: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class _Array:
    """An .npy inside a file: where its rows start, their shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    open: Callable[[], _Rows]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_size(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def data_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(stream, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """An .npy header: shape, dtype and its length in bytes."""
    start = stream.tell()
    try:
        version = np.lib.format.read_magic(stream)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(stream)
    except (ValueError, EOFError, OSError) as error:
        raise DatasetError(f"{name} has no valid .npy header: {error}", where=name) from None
    if fortran and len(shape) > 1:
        raise DatasetError(
            f"{name} is in Fortran order; save it in numpy's default (C) order", where=name
        )
    return tuple(shape), np.dtype(dtype), stream.tell() - start


def _check_arrays(arrays: dict[str, _Array], stored: dict[str, int]) -> None:
    """Each array numeric, non-empty, as long as its partner, holding what it declares."""
    for name, array in arrays.items():
        if not _numeric(array.dtype):
            raise DatasetError(f"{name} holds {array.dtype}, not numbers", where=name)
        if not array.shape or array.rows == 0:
            raise DatasetError(f"{name} is empty (shape {array.shape})", where=name)
        if stored[name] < array.data_bytes:
            raise DatasetError(
                f"{name} declares shape {shown(array.shape)} of {array.dtype} "
                f"({array.data_bytes} bytes) but holds {stored[name]}: the file is truncated",
                where=name,
            )
    for x_name, y_name in _pairs(arrays):
        x, y = arrays[x_name], arrays[y_name]
        if len(y.shape) != 1 and y.shape[1:] != (1,):
            raise DatasetError(
                f"{y_name} must hold one label per row, got shape {shown(y.shape)}", where=y_name
            )
        if x.rows != y.rows:
            raise DatasetError(
                f"{x_name} has {x.rows} rows but {y_name} has {y.rows} labels", where=y_name
            )
    sizes = {arrays[x].row_size for x, _ in _pairs(arrays)}
    if len(sizes) > 1:
        raise DatasetError(
            f"x_train and x_test have different features per row ({sorted(sizes)})",
            where="x_test",
        )


def _pairs(arrays: dict[str, _Array]) -> list[tuple[str, str]]:
    if "x" in arrays:
        return [("x", "y")]
    return [("x_train", "y_train"), ("x_test", "y_test")]


def _array_source(arrays: dict[str, _Array], stored: dict[str, int]) -> _Source:
    _check_arrays(arrays, stored)
    first = arrays[_pairs(arrays)[0][0]]

    def split(x_name: str, y_name: str) -> _Split:
        x, y = arrays[x_name], arrays[y_name]
        return _Split(_Places(x_name, y_name), lambda: _array_blocks(x, y))

    if "x" in arrays:
        splits = {_ALL: split("x", "y")}
    else:
        splits = {_TRAIN: split("x_train", "y_train"), _TEST: split("x_test", "y_test")}
    return _Source(max(1, first.row_size), _feature_dtype(first.dtype), splits)


def _array_blocks(x: _Array, y: _Array) -> Blocks:
    """x's and y's rows in step, a block at a time, read from their streams."""
    rows = block_rows(x.row_size, x.dtype.itemsize)
    with contextlib.closing(x.open()) as x_stream, contextlib.closing(y.open()) as y_stream:
        for start in range(0, x.rows, rows):
            count = min(rows, x.rows - start)
            features = _read_rows(x_stream, x, count).reshape(count, -1)
            yield features, _read_rows(y_stream, y, count).reshape(count)


def _read_rows(stream: _Rows, array: _Array, count: int) -> np.ndarray:
    size = count * max(1, array.row_size) * array.dtype.itemsize
    data = stream.read(size)
    if len(data) < size:
        raise DatasetError(f"{array.name} ends early: the file is truncated", where=array.name)
    return np.frombuffer(data, dtype=array.dtype)


_NPZ_KEYS = (("x_train", "y_train", "x_test", "y_test"), ("x", "y"))


def _open_npz(path: Path, options: ConvertOptions) -> _Source:
    try:
        with zipfile.ZipFile(path) as archive:
            members = {
                info.filename.removesuffix(".npy"): info
                for info in archive.infolist()
                if info.filename.endswith(".npy")
            }
            keys = next((k for k in _NPZ_KEYS if all(key in members for key in k)), None)
            if keys is None:
                raise DatasetError(
                    "an .npz must hold x_train, y_train, x_test, y_test (or x, y); this one "
                    f"holds {shown(sorted(members), limit=200)}",
                    where="file",
                )
            arrays, stored = {}, {}
            for key in keys:
                with archive.open(members[key]) as stream:
                    shape, dtype, header = _read_header(stream, key)
                arrays[key] = _Array(key, shape, dtype, _member_opener(path, members[key], header))
                stored[key] = members[key].file_size - header
    except zipfile.BadZipFile as error:
        raise DatasetError(f"not a valid .npz (zip) file: {error}", where="file") from None
    return _array_source(arrays, stored)


def _member_opener(path: Path, member: zipfile.ZipInfo, header: int) -> Callable[[], _Rows]:
    def open_member() -> _Rows:
        return _ZipMember(path, member, header)

    return open_member


class _ZipMember:
    """A zip member's bytes after its .npy header, with zip errors as DatasetErrors."""

    def __init__(self, path: Path, member: zipfile.ZipInfo, header: int):
        self._archive = zipfile.ZipFile(path)
        self._stream = self._archive.open(member)
        self._name = member.filename.removesuffix(".npy")
        self.read(header)

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._stream.read(size)
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise DatasetError(
                f"{self._name} is corrupt in the zip file: {error}", where=self._name
            ) from None

    def close(self) -> None:
        self._stream.close()
        self._archive.close()


def _open_npy(path: Path, options: ConvertOptions) -> _Source:
    size = path.stat().st_size
    found: list[tuple[tuple[int, ...], np.dtype, int]] = []  # shape, dtype, first row's offset
    with open(path, "rb") as stream:
        while stream.tell() < size and len(found) < 4:
            name = f"array {len(found)}"
            shape, dtype, _ = _read_header(stream, name)
            found.append((shape, dtype, stream.tell()))
            stream.seek(min(size, stream.tell() + math.prod(shape) * dtype.itemsize))
        if stream.tell() < size:
            raise DatasetError(
                "an npy upload holds 2 arrays (x, y) or 4 (x_train, y_train, x_test, y_test); "
                "this one holds more",
                where="file",
            )
    if len(found) not in (2, 4):
        raise DatasetError(
            f"an npy upload holds 2 arrays (x, y) or 4 (x_train, y_train, x_test, y_test); "
            f"this one holds {len(found)}",
            where="file",
        )
    names = _NPZ_KEYS[1] if len(found) == 2 else _NPZ_KEYS[0]
    arrays, stored = {}, {}
    for (shape, dtype, offset), name in zip(found, names, strict=True):
        arrays[name] = _Array(name, shape, dtype, _file_opener(path, offset))
        stored[name] = min(size, offset + math.prod(shape) * dtype.itemsize) - offset
    return _array_source(arrays, stored)


def _file_opener(path: Path, offset: int) -> Callable[[], _Rows]:
    def open_at() -> _Rows:
        stream = open(path, "rb")  # noqa: SIM115 - the caller closes it
        stream.seek(offset)
        return stream

    return open_at


# -- tables: csv and parquet --------------------------------------------------------


def _table_columns(names: list[str], options: ConvertOptions) -> list[str]:
    """The feature columns: every column but the label's, which must be there."""
    if not options.label_column:
        raise DatasetError(
            f"label_column must name the column of class labels (columns: "
            f"{shown(names, limit=200)})",
            where="label_column",
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"columns {shown(duplicates)} appear twice", where="file")
    if options.label_column not in names:
        raise DatasetError(
            f"label_column {shown(options.label_column)} is not a column of the file "
            f"(columns: {shown(names, limit=200)})",
            where="label_column",
        )
    features = [name for name in names if name != options.label_column]
    if not features:
        raise DatasetError("the file has no feature columns besides the label", where="file")
    return features


def _open_csv(path: Path, options: ConvertOptions) -> _Source:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        with open(path, encoding="utf-8", newline="") as text:
            header = next(csv.reader(text), [])
            has_rows = bool(text.readline().strip())
    except UnicodeDecodeError as error:
        raise DatasetError(f"the CSV file is not UTF-8 text: {error}", where="file") from None
    features = _table_columns(header, options)
    if not has_rows:
        raise DatasetError("the CSV file has a header but no rows", where="file")
    places = _Places("rows", "rows", tuple(features), options.label_column, CSV_FIRST_LINE)
    types = {name: pa.float32() for name in features}
    types[options.label_column] = pa.float64()

    def blocks() -> Blocks:
        # pyarrow reads the first block as it opens the file: both can refuse it.
        try:
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=8 * 2**20),
                convert_options=pacsv.ConvertOptions(
                    column_types=types,
                    null_values=[],
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
            for batch in reader:
                yield _table_block(batch, features, options.label_column, np.float32)
        except (pa.ArrowInvalid, UnicodeDecodeError) as error:
            raise _csv_problem(path, header, features, options.label_column, error) from None

    return _Source(len(features), "float32", {_ALL: _Split(places, blocks)})


def _table_block(batch, features: list[str], label: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    columns = [batch.column(name).to_numpy(zero_copy_only=False) for name in features]
    x = np.empty((batch.num_rows, len(features)), dtype=dtype)  # (rows, features), row-major
    for index, column in enumerate(columns):
        x[:, index] = column
    return x, batch.column(label).to_numpy(zero_copy_only=False)


def _csv_problem(
    path: Path, header: list[str], features: list[str], label: str, error: Exception
) -> DatasetError:
    """The first bad row of a CSV that pyarrow refused, found by reading it again in Python."""
    places = _Places("rows", "rows", tuple(features), label, CSV_FIRST_LINE)
    try:
        with open(path, encoding="utf-8", newline="") as text:
            for row, values in enumerate(csv.reader(text), start=-1):
                if row < 0:
                    continue
                line = places.line(row)
                if len(values) != len(header):
                    return DatasetError(
                        f"row {row}{line} has {len(values)} fields; the header has "
                        f"{len(header)}",
                        where=f"rows[{row}]",
                    )
                for name, value in zip(header, values, strict=True):
                    try:
                        float(value)
                    except ValueError:
                        if name == label:
                            where = places.label(row)
                            return DatasetError(
                                f"{where}{line} is {shown(value)}: a label must be an "
                                "integer class number",
                                where=where,
                            )
                        where = f"rows[{row}].{name}"
                        return DatasetError(
                            f"{where}{line} is {shown(value)}, not a number", where=where
                        )
    except UnicodeDecodeError as bad:
        return DatasetError(f"the CSV file is not UTF-8 text: {bad}", where="file")
    except csv.Error as bad:
        return DatasetError(f"the CSV file cannot be parsed: {bad}", where="file")
    return DatasetError(f"the CSV file cannot be read: {error}", where="file")


def _open_parquet(path: Path, options: ConvertOptions) -> _Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"not a valid Parquet file: {error}", where="file") from None
    schema = table.schema_arrow
    features = _table_columns(schema.names, options)
    for name in [*features, options.label_column]:
        kind = schema.field(name).type
        types = pa.types
        if not (types.is_integer(kind) or types.is_floating(kind) or types.is_boolean(kind)):
            what = "labels" if name == options.label_column else "features"
            raise DatasetError(
                f"column {shown(name)} holds {kind}, not numeric {what}", where=f"columns.{name}"
            )
    if table.metadata.num_rows == 0:
        raise DatasetError("the Parquet file has no rows", where="file")
    dtype = "uint8" if all(schema.field(n).type == pa.uint8() for n in features) else "float32"
    places = _Places("rows", "rows", tuple(features), options.label_column)

    def blocks() -> Blocks:
        first = 0
        batches = table.iter_batches(
            batch_size=block_rows(len(features), 4), columns=[*features, options.label_column]
        )
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as error:
                raise DatasetError(
                    f"the Parquet file is truncated or corrupt: {error}", where="file"
                ) from None
            for name in [*features, options.label_column]:
                column = batch.column(name)
                if column.null_count:
                    row = first + int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
                    where = f"rows[{row}].{name}"
                    raise DatasetError(f"{where} is missing (null)", where=where)
            yield _table_block(batch, features, options.label_column, np.dtype(dtype))
            first += batch.num_rows

    return _Source(len(features), dtype, {_ALL: _Split(places, blocks)})


_READERS: dict[str, Callable[[Path, ConvertOptions], _Source]] = {
    "npz": _open_npz,
    "npy": _open_npy,
    "csv": _open_csv,
    "parquet": _open_parquet,
}
