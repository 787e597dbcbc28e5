"""Reading what a job left in its folder: its training log and its SavedModel.

Both are sent to clients in bounded pieces (GetJobLogs, DownloadModel), so a
large log or model never becomes one message, and nothing here holds the
whole of either in memory. Plain files and dataclasses: no gRPC.

A job's folder is the server's, but what is in it is not to be trusted
further than the folder: no symbolic link in it is followed (O_NOFOLLOW on
every open, the model's folder refused when it is a link), so neither RPC
can send a file from outside the job's folder.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from naive_model.config import TrainConfig
from service.jobs.errors import FailedPrecondition, Unavailable
from service.protocol import LogLines, ModelDescription, ModelFilePart, ModelInfo

# At most this many bytes of lines in one LogChunk; a longer line is cut.
LOG_CHUNK_BYTES = 64 * 1024
# Each ModelChunk's data, well under gRPC's 4 MiB message limit.
MODEL_CHUNK_BYTES = 1024 * 1024


def _open_regular(path: Path) -> int:
    """A read-only descriptor of the regular file at `path`, never through a symbolic link.

    Raises:
        FileNotFoundError: nothing at `path`.
        FailedPrecondition: a link, a folder or another kind of file is there.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as error:  # ELOOP for a link; EISDIR is not raised for O_RDONLY
        raise FailedPrecondition(f"{path.name} is not a regular file ({error.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FailedPrecondition(f"{path.name} is not a regular file")
    return fd


def log_size(path: Path) -> int:
    """The log's size in bytes now (0 before the worker created it)."""
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        return 0
    with os.fdopen(fd, "rb") as log:
        return os.fstat(log.fileno()).st_size


def read_log_lines(path: Path, offset: int, *, final: bool) -> LogLines | None:
    """The whole lines of the log at `path` from byte `offset`, at most LOG_CHUNK_BYTES.

    A last line without its line end is held back until it ends, unless
    `final` (the job has ended: nothing more will be written) or it fills a
    whole chunk by itself. None when there is nothing (yet) to send.
    """
    try:
        fd = _open_regular(path)
    except FileNotFoundError:
        return None  # the worker has not started writing it yet
    with os.fdopen(fd, "rb") as log:
        log.seek(offset)
        data = log.read(LOG_CHUNK_BYTES)
    if not data:
        return None
    end = data.rfind(b"\n")
    if end >= 0:
        data = data[: end + 1]
    elif len(data) < LOG_CHUNK_BYTES and not final:
        return None  # a line being written: wait for its end
    text = data.decode(errors="replace")
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()  # the empty string after the last line end
    return LogLines(lines=tuple(lines), next_offset=offset + len(data))


def model_parts(model_dir: Path) -> Iterator[ModelFilePart]:
    """Every regular file under `model_dir`, in path order, in MODEL_CHUNK_BYTES pieces.

    Paths are relative and "/"-separated; symbolic links are not followed (an
    export has none). An empty file is one empty piece.

    Raises:
        FailedPrecondition: `model_dir` is a symbolic link (checked before iterating).
        Unavailable: a file or folder went away while it was read: the model is
            being exported again (replaced whole, by a rename), so what was sent
            is no complete model.
    """
    if model_dir.is_symlink():
        raise FailedPrecondition(f"the model's folder {model_dir.name} is a symbolic link")
    return _model_parts(model_dir)


def _model_parts(model_dir: Path) -> Iterator[ModelFilePart]:
    def vanished(error: OSError) -> NoReturn:
        raise Unavailable(
            "the model changed while it was being sent (it is being exported again); "
            "download it again"
        ) from error

    for root, folders, names in os.walk(model_dir, onerror=vanished):
        folders.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            relative = path.relative_to(model_dir).as_posix()
            offset = 0
            try:
                fd = _open_regular(path)
            except FileNotFoundError as error:
                vanished(error)
            digest = hashlib.sha256()
            with os.fdopen(fd, "rb") as file:
                data = file.read(MODEL_CHUNK_BYTES)
                while True:
                    digest.update(data)
                    following = file.read(MODEL_CHUNK_BYTES) if data else b""
                    last = not following
                    yield ModelFilePart(
                        path=relative,
                        data=data,
                        offset=offset,
                        sha256=digest.hexdigest() if last else "",
                    )
                    if last:
                        break
                    offset += len(data)
                    data = following


def describe_model(
    info: ModelInfo, train: TrainConfig, model_dir: Path, dataset: str = ""
) -> ModelDescription:
    """The model of a job whose training started (`info` is what its worker wrote).

    dataset: what it was trained on (a pushed data set's NAME@sha256:<digest>).
    """
    parameters, inputs = 0, info.input_size
    for layer in train.layers:
        parameters += inputs * layer.units + layer.units  # W (inputs, units) and b (units,)
        inputs = layer.units
    return ModelDescription(
        input_size=info.input_size,
        num_classes=info.num_classes,
        layers=train.layers,
        parameters=parameters,
        exported=(model_dir / "saved_model.pb").is_file(),
        path=model_dir,
        dataset=dataset,
    )
