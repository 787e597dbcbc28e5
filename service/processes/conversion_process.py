"""The server's side of a conversion: start `python -m service.worker.conversion`, wait.

A fresh interpreter per upload, as for training workers (never a fork of the
threaded server): the file is parsed there, so a hostile or huge file costs
that process's memory, and a crash ends only it.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

from service.protocol import ConversionFailed, Converted, ConvertTask

CONVERSION_TIMEOUT_SECONDS = 3600.0
_STDERR_TAIL = 2000


def convert_in_worker(
    task: ConvertTask, timeout: float = CONVERSION_TIMEOUT_SECONDS
) -> Converted | ConversionFailed:
    """Run one conversion in its own process; its answer, or why it has none."""
    process = subprocess.Popen(
        [sys.executable, "-m", "service.worker.conversion"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = process.communicate(pickle.dumps(task), timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return ConversionFailed("error", f"the conversion took more than {timeout:.0f} s")
    except BaseException:
        process.kill()
        process.wait()
        raise
    if process.returncode == 0:
        answer = pickle.loads(out)
        if isinstance(answer, Converted | ConversionFailed):
            return answer
    tail = err.decode("utf-8", "replace")[-_STDERR_TAIL:].strip()
    return ConversionFailed(
        "error", f"the conversion worker ended with status {process.returncode}: {tail}"
    )
