"""Data loading, the BatchGenerator, and the clear errors bad data gets."""

import dataclasses
import socket

import numpy as np
import pytest

from naive_model import data
from naive_model.data import (
    BatchGenerator,
    DatasetNotFoundError,
    dataset_info,
    from_arrays,
    load_dataset,
    load_mnist,
    synthetic_dataset,
)


def _arrays(num_train=12, num_test=4, shape=(3, 2), classes=3):
    rng = np.random.default_rng(0)
    return (
        rng.integers(0, 256, (num_train, *shape), dtype=np.uint8),
        rng.integers(0, classes, num_train).astype(np.uint8),
        rng.integers(0, 256, (num_test, *shape), dtype=np.uint8),
        rng.integers(0, classes, num_test).astype(np.uint8),
    )


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("count,batch", [(10, 3), (12, 4), (5, 128)])
def test_batch_generator_visits_every_sample_once_per_epoch(shuffle, count, batch):
    images = np.arange(count)
    labels = np.arange(count) * 10
    batches = BatchGenerator(images, labels, batch, shuffle=shuffle, seed=1)
    assert batches.num_batches == -(-count // batch)
    for _ in range(3):  # every epoch, including after the first, sees each sample once
        seen = []
        for _ in range(batches.num_batches):
            images_batch, labels_batch = batches.next()
            np.testing.assert_array_equal(labels_batch, images_batch * 10)
            seen.extend(images_batch.tolist())
        assert sorted(seen) == list(range(count))


def test_batch_generator_keeps_the_partial_last_batch():
    batches = BatchGenerator(np.arange(10), np.arange(10), 4)
    sizes = [len(images) for images, _ in batches]
    assert sizes == [4, 4, 2]


def test_uint8_images_are_kept_for_the_device_while_x_train_is_their_scaling():
    dataset = from_arrays("t", *_arrays())
    assert dataset.x_train_uint8 is not None and dataset.x_train_uint8.shape == (12, 6)
    assert dataset.training_images() is dataset.x_train_uint8
    assert dataset.info.feature_bytes == 1
    # A copy whose x_train changed trains on x_train, not on the old pixels.
    normalised = dataclasses.replace(dataset, x_train=dataset.x_train - 0.5)
    reordered = dataclasses.replace(dataset, x_train=dataset.x_train[::-1].copy())
    subset = dataclasses.replace(dataset, x_train=dataset.x_train[:4])
    for changed in (normalised, reordered, subset):
        assert changed.training_images() is changed.x_train
    floats = from_arrays("f", *(a.astype(np.float32) if a.ndim > 1 else a for a in _arrays()))
    assert floats.x_train_uint8 is None and floats.info.feature_bytes == 4


def test_arrays_are_flattened_and_uint8_scaled():
    dataset = from_arrays("t", *_arrays())
    assert dataset.x_train.shape == (12, 6) and dataset.x_train.dtype == np.float32
    assert 0.0 <= dataset.x_train.min() and dataset.x_train.max() <= 1.0
    assert dataset.y_train.dtype == np.int32
    assert dataset.input_size == 6 and dataset.num_classes == 3


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: (a[0], a[1][:-1], a[2], a[3]), "x_train has 12 examples but y_train has 11"),
        (lambda a: (a[0][:0], a[1][:0], a[2], a[3]), "x_train is empty"),
        (lambda a: (a[0], a[1], a[2], a[3].astype(np.float32)), "y_test must hold integer"),
        (lambda a: (a[0].astype(str), a[1], a[2], a[3]), "x_train must hold numbers"),
        (
            lambda a: (np.where(a[0] > 100, np.nan, a[0].astype(np.float32)), *a[1:]),
            "non-finite",
        ),
        (lambda a: (a[0], a[1].astype(np.int64) - 1, a[2], a[3]), "negative label"),
        (lambda a: (a[0], a[1], a[2].reshape(4, 6)[:, :5], a[3]), "6 features per example"),
    ],
    ids=["lengths", "empty", "label-dtype", "image-dtype", "non-finite", "negative", "features"],
)
def test_bad_data_raises_a_clear_value_error(mutate, message):
    with pytest.raises(ValueError, match=message):
        from_arrays("bad", *mutate(_arrays()))


def test_labels_out_of_range_for_the_classes_are_refused():
    with pytest.raises(ValueError, match="label 2 is out of range for 2 classes"):
        from_arrays("bad", *_arrays(classes=3), num_classes=2)


def test_any_npz_of_any_image_shape_and_class_count(tmp_path):
    x_train, y_train, x_test, y_test = _arrays(shape=(4, 4, 3), classes=5)
    np.savez(
        tmp_path / "colours.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
    )
    dataset = load_dataset("colours", data_dir=tmp_path)
    assert (
        dataset.input_size == 48
        and dataset.num_classes == int(max(y_train.max(), y_test.max())) + 1
    )
    info = dataset_info("colours.npz", data_dir=tmp_path)
    assert (info.input_size, info.num_train, info.num_test) == (48, 12, 4)


def test_missing_arrays_are_named(tmp_path):
    np.savez(tmp_path / "half.npz", x_train=np.zeros((2, 2)), y_train=np.zeros(2, np.int8))
    with pytest.raises(ValueError, match="missing arrays x_test, y_test"):
        load_dataset("half", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "..", ".hidden", ""])
def test_dataset_names_cannot_leave_the_data_directory(tmp_path, name):
    with pytest.raises(ValueError, match="plain file name"):
        load_dataset(name, data_dir=tmp_path)


def test_synthetic_data_is_deterministic():
    first, second = synthetic_dataset(), synthetic_dataset()
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)
    assert first.info == dataset_info("synthetic")


def test_mnist_is_found_by_path_environment_and_keras_cache(mnist_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(data.MNIST_ENV, raising=False)
    assert load_mnist(mnist_path).y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    monkeypatch.setenv(data.MNIST_ENV, str(mnist_path))
    assert load_mnist(download=False).x_train.shape == (60000, 784)
    monkeypatch.setenv(data.MNIST_ENV, str(mnist_path.parent))  # a directory works too
    assert load_mnist(download=False).x_test.shape == (10000, 784)
    assert load_mnist(mnist_path.parent, download=False).y_train[0] == 5
    monkeypatch.delenv(data.MNIST_ENV)
    cache = tmp_path / ".keras" / "datasets"
    cache.mkdir(parents=True)
    (cache / "mnist.npz").symlink_to(mnist_path)
    assert load_mnist(download=False).y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def closed_loopback_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/mnist.npz"


def test_mnist_missing_everywhere_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(data.MNIST_ENV, raising=False)
    monkeypatch.setattr(data, "MNIST_URL", closed_loopback_url())  # refused at once

    with pytest.raises(DatasetNotFoundError) as error:
        load_mnist(data_dir=tmp_path / "data")
    message = str(error.value)
    assert str(tmp_path / "data" / "mnist.npz") in message
    assert str(tmp_path / ".keras" / "datasets" / "mnist.npz") in message
    assert "download failed" in message and "refused" in message and data.MNIST_ENV in message
    assert not (tmp_path / ".keras" / "datasets").exists() or not any(
        (tmp_path / ".keras" / "datasets").iterdir()
    )


@pytest.fixture
def served_file(tmp_path):
    """A file served over HTTP on loopback for one test: (its URL, its bytes)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    content = np.arange(100_000, dtype=np.uint8).tobytes()
    (folder / "mnist.npz").write_bytes(content)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/mnist.npz", content
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_download_mnist_writes_the_file_only_when_its_digest_is_mnists(
    tmp_path, monkeypatch, served_file
):
    import hashlib

    url, content = served_file
    monkeypatch.setattr(data, "MNIST_URL", url)
    destination = tmp_path / "cache" / "mnist.npz"

    with pytest.raises(OSError, match="is not MNIST: its SHA-256 is"):
        data.download_mnist(destination)
    assert list(destination.parent.iterdir()) == []  # nothing half-written is left

    monkeypatch.setattr(data, "MNIST_SHA256", hashlib.sha256(content).hexdigest())
    assert data.download_mnist(destination) == destination
    assert destination.read_bytes() == content
    assert list(destination.parent.iterdir()) == [destination]


def write_npz_with_headers(path, shapes, dtype="<f4", data=b"\0" * 64):
    """An .npz whose members' .npy headers declare `shapes` but hold only `data`."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for key, shape in shapes.items():
            member = io.BytesIO()
            header = {"descr": dtype if key.startswith("x") else "<i8", "fortran_order": False}
            np.lib.format.write_array_header_1_0(member, {**header, "shape": shape})
            archive.writestr(f"{key}.npy", member.getvalue() + data)


def test_a_header_declaring_a_huge_shape_is_refused_without_allocating(tmp_path):
    shapes = {"x_train": (10**11, 784), "y_train": (10**11,), "x_test": (8, 784), "y_test": (8,)}
    write_npz_with_headers(tmp_path / "huge.npz", shapes)
    headers = data.read_npz_headers(tmp_path / "huge.npz")
    assert headers["x_train"].shape == (10**11, 784) and headers["x_train"].stored_bytes == 64
    for load in (
        lambda: load_dataset("huge.npz", data_dir=tmp_path),
        lambda: dataset_info("huge.npz", data_dir=tmp_path),
    ):
        with pytest.raises(
            data.DatasetError, match=r"x_train declares shape \(100000000000, 784\)"
        ):
            load()


def test_a_data_set_larger_than_allowed_is_refused_before_loading(tmp_path):
    x_train, y_train, x_test, y_test = _arrays(num_train=1000, shape=(28, 28))
    path = tmp_path / "big.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    headers = data.check_npz(path)  # fits the host: half its memory by default
    assert data.loading_bytes(headers) == 1004 * 784 * 5 + 1004 * 5
    with pytest.raises(
        data.DatasetError, match="needs about 3.8 MiB to load, more than the 1.0 MiB"
    ):
        data.load_npz(path, max_bytes=1024**2)
    with pytest.raises(data.DatasetError, match="needs about"):
        dataset_info("big.npz", data_dir=tmp_path, max_bytes=1024**2)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"not a zip at all", "not a valid .npz"),
        ("object", "must hold numbers"),
        ("bad-magic", "array header is not valid"),
        ("corrupt-deflate", "while decompressing data: invalid block type"),
    ],
)
def test_files_that_are_no_npz_data_set_are_named(tmp_path, content, message):
    import zipfile

    path = tmp_path / "bad.npz"
    if content == "object":
        arrays = _arrays()
        np.savez(path, x_train=arrays[0].astype(object), y_train=arrays[1], x_test=arrays[2],
                 y_test=arrays[3])  # fmt: skip
    elif content == "corrupt-deflate":
        np.savez_compressed(path, **dict(zip(("x_train", "y_train", "x_test", "y_test"),
                                             _arrays(num_train=500), strict=True)))  # fmt: skip
        with zipfile.ZipFile(path) as archive:
            member = archive.getinfo("y_train.npy")
        raw = bytearray(path.read_bytes())
        name_length, extra_length = np.frombuffer(
            raw[member.header_offset + 26 : member.header_offset + 30], "<u2"
        )
        raw[member.header_offset + 30 + name_length + extra_length] = 0xFF  # no deflate block type
        path.write_bytes(bytes(raw))
    elif content == "bad-magic":
        with zipfile.ZipFile(path, "w") as archive:
            for key in ("x_train", "y_train", "x_test", "y_test"):
                archive.writestr(f"{key}.npy", b"\x93NOTNUMPY")
    else:
        path.write_bytes(content)
    with pytest.raises(data.DatasetError, match=message):
        load_dataset("bad.npz", data_dir=tmp_path)


def test_a_link_out_of_the_data_directory_is_refused(tmp_path):
    outside, inside = tmp_path / "outside", tmp_path / "data"
    outside.mkdir()
    inside.mkdir()
    np.savez(outside / "secret.npz", **dict(zip(("x_train", "y_train", "x_test", "y_test"),
                                                 _arrays(), strict=True)))  # fmt: skip
    (inside / "secret.npz").symlink_to(outside / "secret.npz")
    with pytest.raises(ValueError, match="link to a file outside the data directory"):
        load_dataset("secret.npz", data_dir=inside)
    # A link that stays inside is followed, and a data directory that is itself a link works.
    (inside / "alias.npz").symlink_to(inside / "secret.npz")
    (inside / "secret.npz").unlink()
    (outside / "secret.npz").rename(inside / "real.npz")
    (inside / "alias.npz").unlink()
    (inside / "alias.npz").symlink_to(inside / "real.npz")
    (tmp_path / "linked").symlink_to(inside, target_is_directory=True)
    assert dataset_info("alias", data_dir=tmp_path / "linked").num_train == 12


def test_a_malformed_http_answer_is_an_oserror_and_leaves_nothing(tmp_path, monkeypatch):
    """http.client's own errors (here BadStatusLine) are no OSError until download_mnist says so."""
    import socketserver
    import threading

    class NotHttp(socketserver.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            self.wfile.write(b"this is not an HTTP status line\r\n\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), NotHttp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(data, "MNIST_URL", f"http://127.0.0.1:{server.server_address[1]}/")
        destination = tmp_path / "cache" / "mnist.npz"
        with pytest.raises(OSError, match="BadStatusLine"):
            data.download_mnist(destination)
        assert list(destination.parent.iterdir()) == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
