"""Training data read a window at a time from memory-mapped files, in a seeded order.

A data set larger than a memory budget stays on disk, in the canonical layout
(`naive_model.canonical`). Each epoch visits it in blocks of rows (a window,
about 64 batches): the order of the blocks and the order of the rows inside
each are drawn from (seed, epoch, block), so an epoch's order is the same
every time, and the window a resumed run starts in is the one the
uninterrupted run had there. A window's rows are computed alone: the run
holds nothing the size of the data set. tf.data reads the next window while the
compiled loop trains on the current one.

Rows are read with plain file reads, not through the mapping: pages of a
mapping that were touched count in the process's resident memory, so
reading a large file through it would look like holding it.

    data = map_canonical("datasets/sha256-...")
    trainer = Trainer(config, data, window_batches=64)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from naive_model.canonical import open_split, read_manifest
from naive_model.data import DatasetInfo

WINDOW_BATCHES = 64  # batches in one window: 16 measured 0.81 of in-memory speed, 64 0.92
DATA_MODES = ("auto", "memory", "stream")
# Windows alive at once: the one trained on, the one read ahead, and the read buffer.
WINDOWS_HELD = 3
# A host's share of a window is read through a buffer of about this many bytes.
SHARE_BUFFER_BYTES = 2**20


@dataclass(frozen=True)
class MappedDataset:
    """A converted data set opened memory-mapped: nothing is read until asked.

    Features keep their stored dtype (uint8 pixels are scaled inside the
    training step, as `Dataset.x_train_uint8` are).
    """

    name: str
    x_train: np.ndarray  # (num_train, input_size) uint8 or float32, memory-mapped
    y_train: np.ndarray  # (num_train,) int64, memory-mapped
    x_test: np.ndarray  # (num_test, input_size)
    y_test: np.ndarray  # (num_test,)
    num_classes: int

    @property
    def input_size(self) -> int:
        return int(self.x_train.shape[1])

    def training_images(self) -> np.ndarray:
        """The training images as stored, (num_train, input_size), for an in-memory run."""
        return self.x_train

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(
            name=self.name,
            input_size=self.input_size,
            num_classes=self.num_classes,
            num_train=len(self.x_train),
            num_test=len(self.x_test),
            feature_bytes=self.x_train.dtype.itemsize,
        )


def map_canonical(folder: str | os.PathLike, *, name: str | None = None) -> MappedDataset:
    """Open a converted data set's arrays memory-mapped (`canonical.open_split`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    x_train, y_train = open_split(folder, "train")
    x_test, y_test = open_split(folder, "test")
    return MappedDataset(
        name=name or folder.name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=manifest.num_classes,
    )


def window_bytes(input_size: int, feature_bytes: int, batch_size: int, window_batches: int) -> int:
    """What streaming holds of the data: `WINDOWS_HELD` windows of rows and labels."""
    rows = batch_size * window_batches
    return WINDOWS_HELD * rows * (input_size * feature_bytes + 8)


@dataclass(frozen=True)
class DataPlan:
    """How a run holds its training data, and why, in words for its log and transitions."""

    window_batches: int | None  # None: the whole split on every device
    reason: str


def plan_data(info: DatasetInfo, *, batch_size: int, mode: str, budget_bytes: int) -> DataPlan:
    """Stream when asked, or (mode "auto") when holding the data would pass the budget.

    A streamed run holds `window_bytes`: windows of `WINDOW_BATCHES` batches,
    halved until they fit the budget (down to one batch).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in DATA_MODES:
        raise ValueError(f"data_mode must be one of {', '.join(DATA_MODES)}, got {mode!r}")
    # Held whole, a run keeps the split on its device and the arrays it loaded on the host.
    held = info.device_bytes + info.num_train * (info.input_size * info.feature_bytes + 8)
    if mode == "memory":
        return DataPlan(None, f"in memory ({_mib(held)}), as the job asks")
    if mode == "auto" and (not budget_bytes or held <= budget_bytes):
        within = f"within the {_mib(budget_bytes)} budget" if budget_bytes else "no budget set"
        return DataPlan(None, f"in memory ({_mib(held)}, {within})")
    window = WINDOW_BATCHES
    size = info.input_size, info.feature_bytes, batch_size
    while window > 1 and budget_bytes and window_bytes(*size, window) > budget_bytes:
        window //= 2
    why = "as the job asks" if mode == "stream" else f"more than the {_mib(budget_bytes)} budget"
    return DataPlan(
        window,
        f"streamed in windows of {window} batches ({_mib(window_bytes(*size, window))} held; "
        f"the data set takes {_mib(held)}, {why})",
    )


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


def window_block(
    num_rows: int, window_rows: int, window: int, *, seed: int, epoch: int, shuffle: bool = True
) -> tuple[int, np.ndarray]:
    """An epoch's `window`th window: its block's first row, and the order its rows train in.

    Block b holds rows [b * window_rows, (b + 1) * window_rows). An epoch's
    windows are its full blocks in an order drawn from (seed, epoch), then
    the short last block; block b's rows are shuffled with (seed, epoch, b).
    The order is of rows within the block, (rows,): the block is read as it
    lies in the file and the devices gather its rows in this order. Nothing
    the size of the data set is built: a window is found by itself.
    """
    full = num_rows // window_rows
    if window < full:
        blocks = np.random.default_rng([seed, epoch]).permutation(full) if shuffle else None
        block = int(blocks[window]) if blocks is not None else window
    else:
        block = full  # the short block (when there is one) ends every epoch
    start = block * window_rows
    count = min(window_rows, num_rows - start)
    if not shuffle:
        return start, np.arange(count, dtype=np.int64)
    return start, np.random.default_rng([seed, epoch, block]).permutation(count)


def host_rows(order: np.ndarray, batch_size: int, host: int, hosts: int) -> np.ndarray:
    """The rows of a window that one of `hosts` hosts trains on, in the order it trains them.

    Step s of the window trains on order[s * batch_size : (s + 1) * batch_size],
    the global batch, and its replicas take consecutive slices of it, host by
    host: host h's replicas take the h-th of `hosts` equal parts. So every
    row of the window goes to exactly one host, and the cluster trains on the
    batches one host holding the whole window would.

    order: (window_rows,) the window's order, window_rows a multiple of batch_size.
    Returns: (window_rows // hosts,) positions in the window.
    """
    share = batch_size // hosts
    return order.reshape(-1, batch_size)[:, host * share : (host + 1) * share].reshape(-1)


def read_rows(
    array: np.ndarray, start: int, stop: int, out: np.ndarray | None = None
) -> np.ndarray:
    """array[start:stop], into `out` (C-contiguous) when given, else into a new array.

    A memory map is read from its file with one plain read, so its pages do
    not stay in this process's resident memory (a window's block, a batch of
    the test split); an array in memory is copied.
    """
    count = max(0, min(stop, len(array)) - start)
    if out is None:
        out = np.empty((count, *array.shape[1:]), dtype=array.dtype)
    if isinstance(array, np.memmap) and array.filename is not None and count:
        row_bytes = math.prod(array.shape[1:]) * array.dtype.itemsize
        view = memoryview(out.data).cast("B")
        with open(array.filename, "rb", buffering=0) as file:
            file.seek(array.offset + start * row_bytes)
            done = 0
            while done < len(view):
                read = file.readinto(view[done:])
                if not read:
                    raise EOFError(f"{array.filename} ends before row {start + count}")
                done += read
    else:
        out[...] = array[start : start + count]
    return out


def read_block(
    x: np.ndarray, y: np.ndarray, start: int, count: int, window_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, start + count) of x and y, padded with zeros to `window_rows` rows.

    The images are read straight into the window's buffer (`read_rows`).
    """
    images = np.zeros((window_rows, *x.shape[1:]), dtype=x.dtype)  # (window_rows, input_size)
    labels = np.zeros((window_rows,), dtype=np.int64)
    read_rows(x, start, start + count, out=images[:count])  # the leading rows: C-contiguous
    labels[:count] = read_rows(y, start, start + count)
    return images, labels


def read_shard(
    x: np.ndarray, y: np.ndarray, start: int, count: int, positions: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A host's share of the block at `start` (`count` rows): only the rows it trains on.

    positions: (rows,) the host's positions in the block in training order
    (`host_rows`); those at or past `count` are the padding of a short block.
    Returns the images and labels in file order (zero rows for padding), and
    for each training position the row of those arrays that holds it.

    A share is spread row by row over the block, so the file is read in
    spans of about `SHARE_BUFFER_BYTES`, each starting at the next row of the
    share, and the share's rows are copied out. One read per row was 10x
    slower (14.6 ms against 1.5 ms for half of an MNIST window of 8,192 rows),
    and no fewer pages come from the disk: a 4 KiB page holds five 784-byte
    rows, and a share of a half or a quarter has a row in nearly every one.
    """
    in_file_order = np.sort(positions)  # (rows,)
    real = int(np.searchsorted(in_file_order, count))  # rows before the padding
    rows = in_file_order[:real]
    images = np.zeros((len(positions), *x.shape[1:]), dtype=x.dtype)  # (rows, input_size)
    labels = np.zeros((len(positions),), dtype=np.int64)
    labels[:real] = read_rows(y, start, start + count)[rows]  # 8 bytes a row: read whole
    row_bytes = max(1, math.prod(x.shape[1:]) * x.dtype.itemsize)
    span = max(1, SHARE_BUFFER_BYTES // row_bytes)
    buffer = np.empty((span, *x.shape[1:]), dtype=x.dtype)  # (span, input_size)
    done = 0
    while done < real:
        first = int(rows[done])
        stop = min(first + span, count)
        upto = int(np.searchsorted(rows, stop))
        read_rows(x, start + first, start + stop, out=buffer[: stop - first])
        images[done:upto] = buffer[rows[done:upto] - first]
        done = upto
    return images, labels, np.searchsorted(in_file_order, positions)
