"""Reading what a job left in its folder: its training log and its SavedModel.

Both are sent to clients in bounded pieces (GetJobLogs, DownloadModel), so a
large log or model never becomes one message, and nothing here holds the
whole of either in memory. Plain files and dataclasses: no gRPC.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from naive_model.config import TrainConfig
from service.protocol import LogLines, ModelDescription, ModelFilePart, ModelInfo

# At most this many bytes of lines in one LogChunk; a longer line is cut.
LOG_CHUNK_BYTES = 64 * 1024
# Each ModelChunk's data, well under gRPC's 4 MiB message limit.
MODEL_CHUNK_BYTES = 1024 * 1024


def read_log_lines(path: Path, offset: int, *, final: bool) -> LogLines | None:
    """The whole lines of the log at `path` from byte `offset`, at most LOG_CHUNK_BYTES.

    A last line without its line end is held back until it ends, unless
    `final` (the job has ended: nothing more will be written) or it fills a
    whole chunk by itself. None when there is nothing (yet) to send.
    """
    try:
        log = path.open("rb")
    except FileNotFoundError:
        return None  # the worker has not started writing it yet
    with log:
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
    """
    for root, folders, names in os.walk(model_dir):
        folders.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            relative = path.relative_to(model_dir).as_posix()
            offset = 0
            with path.open("rb") as file:
                while True:
                    data = file.read(MODEL_CHUNK_BYTES)
                    if data or not offset:
                        yield ModelFilePart(path=relative, data=data, offset=offset)
                    if len(data) < MODEL_CHUNK_BYTES:
                        break
                    offset += len(data)


def describe_model(info: ModelInfo, train: TrainConfig, model_dir: Path) -> ModelDescription:
    """The model of a job whose training started (`info` is what its worker wrote)."""
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
    )
