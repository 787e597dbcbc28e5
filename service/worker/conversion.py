"""A conversion worker: `python -m service.worker.conversion`, one file, then exit.

Reads a pickled `ConvertTask` on stdin, converts the file
(`naive_model.formats.convert`) and writes a pickled `Converted` or
`ConversionFailed` on stdout. numpy and pyarrow only: no TensorFlow, so it
starts in a fraction of a second. Anything it prints goes to stderr.
"""

from __future__ import annotations

import errno
import pickle
import sys
import time

from naive_model.formats import ConvertOptions, convert
from naive_model.npz import DatasetError
from service.protocol import ConversionFailed, Converted, ConvertTask


def run(task: ConvertTask) -> Converted | ConversionFailed:
    start = time.perf_counter()
    try:
        options = ConvertOptions(
            format=task.format,
            label_column=task.label_column,
            test_fraction=task.test_fraction,
            num_classes=task.num_classes,
        )
        convert(task.source, task.folder, options)
    except DatasetError as error:
        return ConversionFailed("data", str(error), error.where)
    except ValueError as error:  # an option ConvertOptions refused
        return ConversionFailed("data", str(error))
    except OSError as error:
        kind = "disk_full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "error"
        return ConversionFailed(kind, f"{type(error).__name__}: {error}")
    except MemoryError:
        return ConversionFailed("error", "the conversion ran out of memory")
    return Converted(seconds=time.perf_counter() - start)


def main() -> None:
    task = pickle.load(sys.stdin.buffer)
    if not isinstance(task, ConvertTask):
        raise SystemExit(f"expected a ConvertTask, got {type(task).__name__}")
    answer = sys.stdout.buffer
    sys.stdout = sys.stderr  # whatever a library prints must not corrupt the answer
    pickle.dump(run(task), answer)
    answer.flush()


if __name__ == "__main__":
    main()
