"""Data sets and the book's BatchGenerator. numpy only: no TensorFlow here.

A data set is an `.npz` with x_train, y_train, x_test, y_test (Keras's MNIST
format). Images of any shape are flattened; uint8 pixels are scaled to [0, 1].
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from naive_model.canonical import open_split, read_manifest
from naive_model.config import shown
from naive_model.npz import (  # noqa: F401 - part of this module's API
    DATASET_MEMORY_SHARE,
    SPLITS,
    ArrayHeader,
    DatasetError,
    check_npz,
    host_memory_bytes,
    loading_bytes,
    read_npz_headers,
    reading,
)

MNIST_ENV = "NTRAIN_MNIST_PATH"
KERAS_CACHE = Path("~/.keras/datasets/mnist.npz")
# Where keras.datasets.mnist.load_data fetches MNIST from, and the file's SHA-256
# it checks: the same file, fetched without importing Keras and TensorFlow.
MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
MNIST_DOWNLOAD_SECONDS = 300.0

# uint8 pixels p become p / UINT8_SCALE: here, and inside the training step.
UINT8_SCALE = 255.0


class DatasetNotFoundError(FileNotFoundError):
    """No file holds the requested data set; the message says where we looked."""


@dataclass(frozen=True)
class Dataset:
    """Train and test splits, flattened to (examples, features) float32.

    A data set whose training images came as uint8 also keeps them so, in
    `x_train_uint8` (x_train is exactly x_train_uint8 / 255): the `Trainer`
    holds those on its devices, 4x smaller, and scales them inside the step.
    """

    name: str
    x_train: np.ndarray  # (num_train, input_size) float32
    y_train: np.ndarray  # (num_train,) int32
    x_test: np.ndarray  # (num_test, input_size) float32
    y_test: np.ndarray  # (num_test,) int32
    num_classes: int
    x_train_uint8: np.ndarray | None = field(default=None, repr=False)  # (num_train, input_size)

    @property
    def input_size(self) -> int:
        return int(self.x_train.shape[1])

    def training_images(self) -> np.ndarray:
        """The training images to keep on a device, (num_train, input_size).

        x_train_uint8 when x_train still is its scaling (checked on a sample of
        rows: a copy with a changed x_train, normalised or reordered, must not
        train on the old pixels), else x_train.
        """
        pixels = self.x_train_uint8
        if pixels is None or pixels.shape != self.x_train.shape:
            return self.x_train
        rows = np.unique(np.linspace(0, len(pixels) - 1, num=min(len(pixels), 257), dtype=int))
        if not np.array_equal(to_features(pixels[rows]), self.x_train[rows]):
            return self.x_train
        return pixels

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(
            name=self.name,
            input_size=self.input_size,
            num_classes=self.num_classes,
            num_train=len(self.x_train),
            num_test=len(self.x_test),
            feature_bytes=1 if self.x_train_uint8 is not None else 4,
        )


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_size: int
    num_classes: int
    num_train: int
    num_test: int
    feature_bytes: int = 4  # per feature on the device: 1 for uint8 images, else 4 (float32)

    @property
    def device_bytes(self) -> int:
        """What the Trainer keeps on each replica's device: images, int64 labels and order."""
        return self.num_train * (self.input_size * self.feature_bytes + 8 + 8)


def from_arrays(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int | None = None,
) -> Dataset:
    """Check, flatten and scale raw arrays into a Dataset.

    Raises:
        DatasetError: empty splits, mismatched lengths, wrong dtypes, non-finite
            values, negative labels, or labels >= num_classes.
    """
    splits = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    for key, array in splits.items():
        if not isinstance(array, np.ndarray):
            raise DatasetError(f"{name}: {key} must be a numpy array, got {type(array).__name__}")
        if array.ndim == 0 or len(array) == 0:
            raise DatasetError(f"{name}: {key} is empty")
    for split in ("train", "test"):
        x, y = splits[f"x_{split}"], splits[f"y_{split}"]
        if len(x) != len(y):
            raise DatasetError(
                f"{name}: x_{split} has {len(x)} examples but y_{split} has {len(y)} labels"
            )
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise DatasetError(f"{name}: x_{split} must hold numbers, got dtype {x.dtype}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"{name}: y_{split} must hold integer class labels, got {y.dtype}")
        if y.ndim != 1:
            raise DatasetError(f"{name}: y_{split} must be one label per example, got {y.shape}")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise DatasetError(f"{name}: x_{split} holds non-finite values (NaN or infinity)")
        if y.min() < 0:
            raise DatasetError(f"{name}: y_{split} holds a negative label {int(y.min())}")
    train_features = math.prod(x_train.shape[1:])
    test_features = math.prod(x_test.shape[1:])
    if train_features != test_features:
        raise DatasetError(
            f"{name}: x_train has {train_features} features per example, x_test {test_features}"
        )
    labels_seen = int(max(y_train.max(), y_test.max())) + 1
    if num_classes is None:
        num_classes = labels_seen
    elif labels_seen > num_classes:
        raise DatasetError(
            f"{name}: label {labels_seen - 1} is out of range for {num_classes} classes"
        )
    return Dataset(
        name=name,
        x_train=to_features(x_train),
        y_train=y_train.astype(np.int32),
        x_test=to_features(x_test),
        y_test=y_test.astype(np.int32),
        num_classes=num_classes,
        x_train_uint8=x_train.reshape(len(x_train), -1) if x_train.dtype == np.uint8 else None,
    )


def to_features(images: np.ndarray) -> np.ndarray:
    """Flatten to (examples, features) float32; uint8 pixels are scaled to [0, 1].

    The one place that scaling is written: data sets, and the inputs a client
    sends to a model trained on them, go through it.
    """
    flat = images.reshape(len(images), -1)  # (examples, features)
    if flat.dtype == np.uint8:
        # One pass straight to float32: astype-then-divide takes 20x longer on 60k images.
        return np.divide(flat, np.float32(UINT8_SCALE), dtype=np.float32)
    return flat.astype(np.float32)


def load_npz(
    path: str | os.PathLike, *, name: str | None = None, max_bytes: int | None = None
) -> Dataset:
    """Load an .npz holding x_train, y_train, x_test and y_test.

    The arrays' headers are checked first (`check_npz`), so a file that
    declares more data than it holds, or more than memory allows, is refused
    without allocating anything.

    Args:
        max_bytes: the most loading may take; None means `DATASET_MEMORY_SHARE`
            of this host's memory.

    Raises:
        DatasetError: the file is no usable data set; the message says why.
    """
    path = Path(path)
    check_npz(path, max_bytes=max_bytes)
    with reading(path, "an array cannot be read"), np.load(path, allow_pickle=False) as archive:
        arrays = [archive[key] for key in SPLITS]
    return from_arrays(name or path.stem, *arrays)


def load_canonical(folder: str | os.PathLike, *, name: str | None = None) -> Dataset:
    """Load a data set converted to the canonical layout (`naive_model.canonical`).

    Nothing is parsed: the arrays are memory-mapped and copied into the
    Dataset's float32 form (uint8 features are also kept as they are).

    Raises:
        DatasetError: the folder holds no readable converted data set.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    x_train, y_train = open_split(folder, "train")
    x_test, y_test = open_split(folder, "test")
    return Dataset(
        name=name or folder.name,
        x_train=to_features(x_train),
        y_train=y_train.astype(np.int32),
        x_test=to_features(x_test),
        y_test=y_test.astype(np.int32),
        num_classes=manifest.num_classes,
        x_train_uint8=np.array(x_train) if x_train.dtype == np.uint8 else None,
    )


def canonical_info(folder: str | os.PathLike, *, name: str | None = None) -> DatasetInfo:
    """Sizes of a converted data set, from its manifest alone."""
    manifest = read_manifest(folder)
    return DatasetInfo(
        name=name or Path(folder).name,
        input_size=manifest.input_size,
        num_classes=manifest.num_classes,
        num_train=manifest.num_train,
        num_test=manifest.num_test,
        feature_bytes=manifest.feature_bytes,
    )


def mnist_candidates(path: str | os.PathLike | None = None, data_dir=None) -> list[Path]:
    """Where MNIST is looked for, in order."""
    candidates = []
    for given in (path, os.environ.get(MNIST_ENV) or None):
        if given is not None:
            given = Path(given).expanduser()
            # A path or a directory: a directory holds mnist.npz.
            candidates.append(given / "mnist.npz" if given.is_dir() else given)
    if data_dir is not None:
        candidates.append(Path(data_dir).expanduser() / "mnist.npz")
    candidates.append(KERAS_CACHE.expanduser())
    return candidates


def dataset_file_identity(name: str, data_dir: Path | None) -> tuple:
    """What changes when the file behind a data set name changes (nothing for synthetic).

    The path, inode, modification time and size of the file the name resolves
    to: a cache keyed by it reads a replaced file anew.
    """
    if name == "synthetic":
        return ()
    if name == "mnist":
        paths = mnist_candidates(data_dir=data_dir)
    else:
        paths = [Path(data_dir) / name, Path(data_dir) / f"{name}.npz"] if data_dir else []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        return (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return ()


def find_mnist(path: str | os.PathLike | None = None, data_dir=None) -> Path | None:
    """The first MNIST file on disk among `mnist_candidates`; None when there is none."""
    return next((p for p in mnist_candidates(path, data_dir) if p.is_file()), None)


def load_mnist(path: str | os.PathLike | None = None, *, data_dir=None, download=True) -> Dataset:
    """Load MNIST from a path, $NTRAIN_MNIST_PATH, data_dir, Keras's cache, or a download.

    `path` and $NTRAIN_MNIST_PATH may name the file or a directory holding mnist.npz.

    Raises:
        DatasetNotFoundError: nowhere held it and the download failed; the
            message lists every place tried and how to fix it.
    """
    found = find_mnist(path, data_dir)
    if found is not None:
        return load_npz(found, name="mnist")
    tried = mnist_candidates(path, data_dir)
    reason = "download not attempted"
    if download:
        try:
            return load_npz(download_mnist(), name="mnist")
        except OSError as error:  # urllib's errors are OSErrors; so is a wrong digest
            reason = f"download failed: {type(error).__name__}: {error}"
    places = ", ".join(str(candidate) for candidate in tried)
    raise DatasetNotFoundError(
        f"MNIST not found (looked in {places}; {reason}). Put Keras's mnist.npz in one of those "
        f"places or set {MNIST_ENV}=/path/to/mnist.npz."
    )


def download_mnist(
    destination: str | os.PathLike = KERAS_CACHE, *, seconds: float = MNIST_DOWNLOAD_SECONDS
) -> Path:
    """Fetch Keras's mnist.npz to `destination` (Keras's cache), checked by its SHA-256.

    The file appears whole or not at all: it is written beside its destination
    and renamed once its digest matches. Proxies come from the environment, as
    for any urllib request.

    Raises:
        OSError: the download failed, took more than `seconds`, or its digest
            is not MNIST's.
    """
    destination = Path(destination).expanduser()
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.part")
    deadline = time.monotonic() + seconds
    digest = hashlib.sha256()
    try:
        try:
            with urllib.request.urlopen(MNIST_URL, timeout=min(seconds, 30.0)) as answer:
                with partial.open("wb") as out:
                    while chunk := answer.read(1 << 20):
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"the download took more than {seconds:.0f} s")
                        digest.update(chunk)
                        out.write(chunk)
        except http.client.HTTPException as error:  # a cut-off body: not an OSError
            raise OSError(f"{type(error).__name__}: {error}") from error
        if digest.hexdigest() != MNIST_SHA256:
            raise OSError(f"{MNIST_URL} is not MNIST: its SHA-256 is {digest.hexdigest()}")
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)
    return destination


def synthetic_dataset(
    *,
    num_train: int = 2048,
    num_test: int = 512,
    input_size: int = 784,
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """A deterministic, learnable data set: noisy copies of one prototype per class."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((num_classes, input_size), dtype=np.float32)  # (classes, features)

    def sample(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, size=count)
        noise = rng.normal(0.0, 0.3, size=(count, input_size)).astype(np.float32)
        return np.clip(prototypes[labels] + noise, 0.0, 1.0), labels

    x_train, y_train = sample(num_train)
    x_test, y_test = sample(num_test)
    return from_arrays("synthetic", x_train, y_train, x_test, y_test, num_classes=num_classes)


def is_plain_file_name(name: str) -> bool:
    """Whether a data set name can only mean a file directly inside the data directory."""
    return (
        bool(name)
        and not any(part in name for part in ("/", "\\", "..", "\x00"))
        and not name.startswith(".")
    )


def resolve_dataset_path(name: str, data_dir: str | os.PathLike | None) -> Path:
    """The file inside data_dir that a data set name refers to.

    Raises:
        ValueError: the name is empty or reaches outside data_dir, itself or
            through a symbolic link.
        DatasetNotFoundError: no such file.
    """
    if not is_plain_file_name(name):
        raise ValueError(
            f"dataset must be a plain file name inside the data directory, got {shown(name)}"
        )
    if data_dir is None:
        raise DatasetNotFoundError(f"dataset {shown(name)}: no data directory is configured")
    directory = Path(data_dir)
    for candidate in (directory / name, directory / f"{name}.npz"):
        if candidate.is_file():
            # A symbolic link may point anywhere; the file it reaches must be inside.
            resolved = candidate.resolve()
            if not resolved.is_relative_to(directory.resolve()):
                raise ValueError(
                    f"dataset {shown(name)} is a link to a file outside the data directory"
                )
            return resolved
    raise DatasetNotFoundError(f"dataset {shown(name)} not found in {directory}")


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
) -> Dataset:
    """Load "mnist", "synthetic", an .npz file named inside data_dir, or a converted folder.

    Args:
        folder: a data set in the canonical layout (`load_canonical`), called `name`.
    """
    if folder is not None:
        return load_canonical(folder, name=name)
    if name == "synthetic":
        return synthetic_dataset()
    if name == "mnist":
        return load_mnist(data_dir=data_dir)
    return load_npz(resolve_dataset_path(name, data_dir), name=name)


def dataset_info(
    name: str, *, data_dir: str | os.PathLike | None = None, max_bytes: int | None = None
) -> DatasetInfo:
    """Sizes of a data set, for validating a request before training.

    Reads the arrays' headers (`check_npz`, with `max_bytes` as there) and
    the labels only: the images are never loaded.
    """
    if name == "synthetic":
        return synthetic_dataset().info
    if name == "mnist":
        path = find_mnist(data_dir=data_dir)
        if path is None:
            return load_mnist(data_dir=data_dir).info
    else:
        path = resolve_dataset_path(name, data_dir)
    headers = check_npz(path, max_bytes=max_bytes)
    with reading(path, "an array cannot be read"), np.load(path, allow_pickle=False) as archive:
        y_train, y_test = archive["y_train"], archive["y_test"]
    x_train, x_test = headers["x_train"], headers["x_test"]
    return DatasetInfo(
        name=name,
        input_size=math.prod(x_train.shape[1:]),
        num_classes=int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1,
        num_train=x_train.shape[0],
        num_test=x_test.shape[0],
        feature_bytes=1 if x_train.dtype == np.uint8 else 4,
    )


class BatchGenerator:
    """Batches over in-memory arrays, the book's API with its bugs fixed.

    The book's version advanced with `self.index += self.batch_size` written as
    a slice typo, never reset between epochs and dropped the partial last
    batch. This one visits every example exactly once per epoch (the last batch
    may be smaller), starts a new epoch when one ends, and can shuffle.
    """

    def __init__(self, images, labels, batch_size: int = 128, *, shuffle=False, seed=0):
        if len(images) != len(labels):
            raise ValueError(f"images has {len(images)} examples but labels has {len(labels)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.num_batches = math.ceil(len(images) / batch_size)
        self._rng = np.random.default_rng(seed) if shuffle else None
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.index = 0
        self._order = self._rng.permutation(len(self.images)) if self._rng is not None else None

    def next(self):
        """The next (images, labels) batch; after the last one, a new epoch begins."""
        if self.index >= len(self.images):
            self._start_epoch()
        stop = self.index + self.batch_size
        batch: slice | np.ndarray
        if self._order is None:
            batch = slice(self.index, stop)
        else:
            batch = self._order[self.index : stop]
        self.index = stop
        return self.images[batch], self.labels[batch]

    def __iter__(self):
        """One epoch of batches."""
        self._start_epoch()
        for _ in range(self.num_batches):
            yield self.next()
