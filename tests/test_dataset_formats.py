"""Data set files in four formats, converted once to the canonical layout, and bad data refused.

No TensorFlow and no server: `naive_model.formats.convert` on real files.
The bad-data table below is the one UploadDataset answers with (its field
violations are `file.` + `where`).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from naive_model.canonical import NpyWriter, open_split, read_manifest, split_rows
from naive_model.data import canonical_info, load_canonical, load_npz
from naive_model.formats import ConvertOptions, convert
from naive_model.npz import DatasetError

RNG = np.random.default_rng(7)
X = RNG.random((1000, 5)).astype(np.float32)  # (rows, features)
Y = RNG.integers(0, 3, 1000)  # (rows,)


def write_csv(path, x=X, y=Y, label_at=2):
    names = [f"f{i}" for i in range(x.shape[1])]
    names.insert(label_at, "label")
    lines = [",".join(names)]
    for row, label in zip(x, y, strict=True):
        values = [repr(float(v)) for v in row]
        values.insert(label_at, str(int(label)))
        lines.append(",".join(values))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path, x=X, y=Y):
    pq.write_table(pa.table({**{f"f{i}": x[:, i] for i in range(x.shape[1])}, "label": y}), path)
    return path


def npy_pair(*arrays) -> bytes:
    stream = io.BytesIO()
    for array in arrays:
        np.save(stream, array)
    return stream.getvalue()


def npz_bytes(**arrays) -> bytes:
    stream = io.BytesIO()
    np.savez(stream, **arrays)
    return stream.getvalue()


def test_mnist_npz_keeps_its_splits_and_its_uint8_pixels(tmp_path, mnist_path):
    manifest = convert(mnist_path, tmp_path / "out", ConvertOptions(format="npz"))
    assert (manifest.num_train, manifest.num_test, manifest.input_size) == (60000, 10000, 784)
    assert manifest.feature_dtype == "uint8" and manifest.test_fraction is None
    x_train, y_train = open_split(tmp_path / "out", "train")
    assert isinstance(x_train, np.memmap) and x_train.dtype == np.uint8
    assert x_train.flags.c_contiguous and y_train.dtype == np.int64
    keras = load_npz(mnist_path)
    assert np.array_equal(x_train, keras.x_train_uint8)
    assert np.array_equal(y_train, keras.y_train)
    loaded = load_canonical(tmp_path / "out", name="mnist")
    assert np.array_equal(loaded.x_test, keras.x_test) and loaded.num_classes == 10


@pytest.mark.parametrize("kind", ["csv", "parquet", "npy"])
def test_tables_and_pairs_get_a_seeded_tenth_for_testing(tmp_path, kind):
    source = tmp_path / f"data.{kind}"
    if kind == "csv":
        write_csv(source)
    elif kind == "parquet":
        write_parquet(source)
    else:
        source.write_bytes(npy_pair(X, Y))
    label = "" if kind == "npy" else "label"
    manifest = convert(source, tmp_path / "out", ConvertOptions(format=kind, label_column=label))
    assert (manifest.num_train, manifest.num_test) == (900, 100)
    assert manifest.test_fraction == 0.1 and manifest.num_classes == 3
    train, test = split_rows(1000, 0.1, seed=0)
    x_train, y_train = open_split(tmp_path / "out", "train")
    x_test, y_test = open_split(tmp_path / "out", "test")
    assert np.array_equal(x_train, X[train]) and np.array_equal(y_train, Y[train])
    assert np.array_equal(x_test, X[test]) and np.array_equal(y_test, Y[test])
    info = canonical_info(tmp_path / "out")
    assert (info.input_size, info.feature_bytes) == (5, 4)


def test_the_split_is_the_same_every_time_and_takes_the_fraction_asked(tmp_path):
    write_csv(tmp_path / "a.csv")
    for folder in ("one", "two"):
        convert(
            tmp_path / "a.csv",
            tmp_path / folder,
            ConvertOptions(format="csv", label_column="label", test_fraction=0.25),
        )
    assert read_manifest(tmp_path / "one").num_test == 250
    for name in ("x_train", "y_test"):
        one = (tmp_path / "one" / f"{name}.npy").read_bytes()
        assert one == (tmp_path / "two" / f"{name}.npy").read_bytes()


def test_parquet_uint8_columns_stay_uint8(tmp_path):
    pixels = RNG.integers(0, 256, (50, 4), dtype=np.uint8)
    columns = {f"p{i}": pixels[:, i] for i in range(4)}
    pq.write_table(pa.table({**columns, "digit": Y[:50]}), tmp_path / "p.parquet")
    options = ConvertOptions(format="parquet", label_column="digit")
    manifest = convert(tmp_path / "p.parquet", tmp_path / "out", options)
    assert manifest.feature_dtype == "uint8"
    x_train, _ = open_split(tmp_path / "out", "train")
    assert x_train.dtype == np.uint8 and set(x_train.ravel()) <= set(pixels.ravel())


def test_an_appended_npy_is_valid_and_memory_maps(tmp_path):
    writer = NpyWriter(tmp_path / "x.npy", np.dtype(np.float32), (3,))
    writer.append(np.ones((2, 3)))
    writer.append(np.zeros((1, 3)))
    writer.close()
    array = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert array.shape == (3, 3) and array[0, 0] == 1 and array[2, 0] == 0


def _corrupt_parquet_footer() -> bytes:
    stream = io.BytesIO()
    pq.write_table(pa.table({"a": X[:, 0], "label": Y}), stream)
    data = bytearray(stream.getvalue())
    data[-60:-8] = b"\xff" * 52  # the footer's metadata, before its length and magic
    return bytes(data)


def _mnist_half(mnist_path) -> bytes:
    raw = mnist_path.read_bytes()
    return raw[: len(raw) // 2]


def _mnist_flipped(mnist_path) -> bytes:
    raw = bytearray(mnist_path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 100] = bytes(100)
    return bytes(raw)


CSV = {"format": "csv", "label_column": "y"}
# (case, file name, its content, options, where, words of the message)
BAD_DATA = [
    ("non-numeric feature", "a.csv", "a,b,y\n1,2,0\n3,x,1\n", CSV, "rows[1].b", "(line 3) is 'x'"),
    ("empty feature", "a.csv", "a,b,y\n1,,0\n", CSV, "rows[0].b", "not a number"),
    ("NaN", "a.csv", "a,b,y\n1,2,0\n3,nan,1\n", CSV, "rows[1].b", "(line 3) is nan: features"),
    ("infinity", "a.csv", "a,b,y\n1,2,0\n-inf,2,1\n", CSV, "rows[1].a", "(line 3) is -inf"),
    ("fractional label", "a.csv", "a,b,y\n1,2,0\n3,4,1.5\n", CSV, "rows[1].y", "(line 3) is 1.5"),
    ("word as label", "a.csv", "a,b,y\n1,2,0\n3,4,cat\n", CSV, "rows[1].y", "integer"),
    ("negative label", "a.csv", "a,b,y\n1,2,0\n3,4,-1\n", CSV, "rows[1].y", "(line 3) is -1: a"),
    (
        "label past num_classes",
        "a.csv",
        "a,b,y\n1,2,0\n3,4,7\n",
        {**CSV, "num_classes": 5},
        "rows[1].y",
        "(line 3) is 7: a label must be in [0, 5)",
    ),
    ("ragged row", "a.csv", "a,b,y\n1,2,0\n3,4\n", CSV, "rows[1]", "row 1 (line 3) has 2 fields"),
    (
        "missing label column",
        "a.csv",
        "a,b,y\n1,2,0\n",
        {**CSV, "label_column": "z"},
        "label_column",
        "not a column",
    ),
    ("empty file", "a.csv", b"", CSV, "file", "empty"),
    ("header only", "a.csv", "a,b,y\n", CSV, "file", "no rows"),
    ("not UTF-8", "a.csv", b"a,b,y\n1,\xff\xfe,0\n", CSV, "file", "UTF-8"),
    ("truncated zip", "a.npz", _mnist_half, {"format": "npz"}, "file", "not a valid .npz"),
    ("corrupt zip", "a.npz", _mnist_flipped, {"format": "npz"}, "x_train", "corrupt"),
    (
        "ragged arrays",
        "a.npz",
        npz_bytes(x_train=np.ones((3, 2)), y_train=[0, 1], x_test=np.ones((1, 2)), y_test=[0]),
        {"format": "npz"},
        "y_train",
        "3 rows but y_train has 2",
    ),
    (
        "NaN in an array",
        "a.npz",
        npz_bytes(x_train=[[1.0, np.nan]] * 3, y_train=[0, 1, 1], x_test=[[1.0, 1]], y_test=[0]),
        {"format": "npz"},
        "x_train[0][1]",
        "x_train[0][1] is nan: features",  # an array has no lines
    ),
    (
        "float labels",
        "a.npz",
        npz_bytes(x_train=np.ones((2, 2)), y_train=[0.5, 1], x_test=np.ones((1, 2)), y_test=[0]),
        {"format": "npz"},
        "y_train[0]",
        "integer",
    ),
    (
        "truncated npy",
        "a.npy",
        npy_pair(X, Y)[:-100],
        {"format": "npy"},
        "y",
        "truncated",
    ),
    ("one npy array", "a.npy", npy_pair(X), {"format": "npy"}, "file", "holds 1"),
    (
        "truncated Parquet",
        "a.parquet",
        lambda _: _corrupt_parquet_footer()[:300],
        {"format": "parquet", "label_column": "label"},
        "file",
        "Parquet",
    ),
    (
        "corrupt Parquet footer",
        "a.parquet",
        lambda _: _corrupt_parquet_footer(),
        {"format": "parquet", "label_column": "label"},
        "file",
        "Parquet",
    ),
    (
        "string column",
        "a.parquet",
        lambda _: _parquet_bytes({"a": ["x", "y"], "label": [0, 1]}),
        {"format": "parquet", "label_column": "label"},
        "columns.a",
        "not numeric",
    ),
    (
        "null value",
        "a.parquet",
        lambda _: _parquet_bytes({"a": [1.0, None], "label": [0, 1]}),
        {"format": "parquet", "label_column": "label"},
        "rows[1].a",
        "missing",
    ),
]


def _parquet_bytes(columns) -> bytes:
    stream = io.BytesIO()
    pq.write_table(pa.table(columns), stream)
    return stream.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "options", "where", "words"),
    [case[1:] for case in BAD_DATA],
    ids=[case[0] for case in BAD_DATA],
)
def test_bad_data_is_refused_naming_the_place(
    tmp_path, mnist_path, name, content, options, where, words
):
    if callable(content):
        content = content(mnist_path)
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    with pytest.raises(DatasetError) as refused:
        convert(path, tmp_path / "out", ConvertOptions(**options))
    assert refused.value.where == where
    assert words in str(refused.value)
    assert not (tmp_path / "out").exists()  # nothing half-converted stays


def test_the_manifest_is_plain_json(tmp_path):
    write_csv(tmp_path / "a.csv")
    options = ConvertOptions(format="csv", label_column="label")
    convert(tmp_path / "a.csv", tmp_path / "out", options)
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data["feature_dtype"] == "float32" and data["label_column"] == "label"
