"""A live training progress bar for the terminal, with no dependencies.

On a TTY one line is redrawn in place:

    epoch 1/2 [=========>          ] 234/469  loss 0.2345  acc 93.12%  41.2k ex/s  0:07

When the output is not a TTY (a pipe, a log file, CI) the renderer writes plain
lines instead, at most one every `plain_interval` seconds, so a log stays short.
Epoch summaries and messages are always written, on their own lines.

The renderer takes anything with the fields of `ntrain.v1.Progress` and
`ntrain.v1.EpochSummary`; it does not import the protobuf code.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO


class ProgressLike(Protocol):
    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    step_in_epoch: int
    loss: float
    accuracy: float
    examples_per_second: float


class EpochSummaryLike(Protocol):
    epoch: int
    train_loss: float
    train_accuracy: float
    eval_loss: float
    eval_accuracy: float
    seconds: float


_CLEAR_LINE = "\r\x1b[K"
_MAX_BAR_WIDTH = 30
_MIN_BAR_WIDTH = 10


def format_rate(examples_per_second: float) -> str:
    """12345.6 -> '12.3k'; keeps the bar's width steady as the rate changes."""
    if examples_per_second >= 1e6:
        return f"{examples_per_second / 1e6:.1f}M"
    if examples_per_second >= 1e3:
        return f"{examples_per_second / 1e3:.1f}k"
    return f"{examples_per_second:.0f}"


def format_duration(seconds: float) -> str:
    """65.2 -> '1:05', 3700 -> '1:01:40'."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{minutes}:{seconds:02d}"


def bar(fraction: float, width: int) -> str:
    """'[=====>    ]' with `width` cells inside the brackets."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(fraction * width)
    if filled >= width:
        return "[" + "=" * width + "]"
    if not filled:
        return "[" + " " * width + "]"
    return "[" + "=" * (filled - 1) + ">" + " " * (width - filled) + "]"


def format_progress_line(progress: ProgressLike, *, elapsed: float, width: int) -> str:
    """The in-place TTY line, fitted to `width` columns.

    Numbers are padded to fixed widths so the bar does not change length as
    they change.
    """
    epochs = f"/{progress.epochs}" if progress.epochs else ""
    head = f"epoch {progress.epoch}{epochs} "
    steps = progress.steps_per_epoch
    digits = len(str(steps)) if steps else 1
    tail = (
        f" {progress.step_in_epoch:>{digits}}/{steps}"
        f"  loss {progress.loss:.4f}  acc {100 * progress.accuracy:6.2f}%"
        f"  {format_rate(progress.examples_per_second):>6} ex/s  {format_duration(elapsed)}"
    )
    room = width - 1 - len(head) - len(tail) - 2  # 1 column spare: no wrap in any terminal
    cells = min(_MAX_BAR_WIDTH, room)
    fraction = progress.step_in_epoch / steps if steps else 0.0
    line = head + (bar(fraction, cells) if cells >= _MIN_BAR_WIDTH else "") + tail
    return line[: width - 1]


def format_plain_progress(progress: ProgressLike) -> str:
    """A progress line for logs: every field spelled out."""
    epochs = f"/{progress.epochs}" if progress.epochs else ""
    return (
        f"epoch {progress.epoch}{epochs} step {progress.step_in_epoch}/{progress.steps_per_epoch}"
        f" loss {progress.loss:.4f} accuracy {100 * progress.accuracy:.2f}%"
        f" {progress.examples_per_second:.0f} examples/s"
    )


def format_epoch_summary(summary: EpochSummaryLike, epochs: int = 0) -> str:
    """'epoch 1/2 done in 5.2 s: loss 0.2345, accuracy 93.12%; test loss ..., accuracy ...'."""
    of = f"/{epochs}" if epochs else ""
    line = (
        f"epoch {summary.epoch}{of} done in {summary.seconds:.1f} s: "
        f"loss {summary.train_loss:.4f}, accuracy {100 * summary.train_accuracy:.2f}%"
    )
    if summary.eval_loss or summary.eval_accuracy:
        line += f"; test loss {summary.eval_loss:.4f}, accuracy {100 * summary.eval_accuracy:.2f}%"
    return line


class ProgressRenderer:
    """Draws progress events as a live bar on a TTY, or as throttled lines elsewhere.

    Args:
        stream: where to write; standard output by default.
        tty: force bar (True) or plain (False) mode; by default, `stream.isatty()`.
        width: terminal columns; by default asked of the terminal (80 without one).
        plain_interval: least seconds between two plain progress lines.
        redraw_interval: least seconds between two redraws of the bar, so a
            flood of events (one step per compiled call) does not flood the terminal.
        clock: seconds, monotonic; tests pass a fake.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        width: int | None = None,
        plain_interval: float = 5.0,
        redraw_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream if stream is not None else sys.stdout
        self.tty = _isatty(self.stream) if tty is None else tty
        self._width = width
        self.plain_interval = plain_interval
        self.redraw_interval = redraw_interval
        self.clock = clock
        self._started = clock()
        self._last_write: float | None = None
        self._bar_shown = ""  # the bar line currently on screen (TTY mode)
        self._pending: ProgressLike | None = None  # a throttled event not yet drawn

    @property
    def width(self) -> int:
        if self._width is not None:
            return self._width
        return shutil.get_terminal_size((80, 24)).columns

    def progress(self, progress: ProgressLike) -> None:
        """Show one progress event (throttled; the end of an epoch is always shown)."""
        now = self.clock()
        interval = self.redraw_interval if self.tty else self.plain_interval
        epoch_done = progress.steps_per_epoch and progress.step_in_epoch >= progress.steps_per_epoch
        if self._last_write is not None and now - self._last_write < interval and not epoch_done:
            self._pending = progress
            return
        self._pending = None
        self._last_write = now
        if self.tty:
            line = format_progress_line(progress, elapsed=now - self._started, width=self.width)
            self._write(_CLEAR_LINE + line)
            self._bar_shown = line
        else:
            self._write(format_plain_progress(progress) + "\n")

    def epoch_end(self, summary: EpochSummaryLike, epochs: int = 0) -> None:
        """Finish the epoch's bar and print its summary on a line of its own."""
        self._flush_pending()
        self.line(format_epoch_summary(summary, epochs))

    def line(self, text: str) -> None:
        """Print a permanent line; on a TTY the bar is redrawn beneath it."""
        if self.tty and self._bar_shown:
            self._write(_CLEAR_LINE + text + "\n" + self._bar_shown)
        else:
            self._write(text + "\n")

    def close(self) -> None:
        """Leave the last bar on screen and move to a fresh line."""
        self._flush_pending()
        if self.tty and self._bar_shown:
            self._write("\n")
        self._bar_shown = ""

    def _flush_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._last_write = None
            self.progress(pending)
        # An epoch's summary follows its bar: start the next epoch on a new line.
        if self.tty and self._bar_shown:
            self._write("\n")
            self._bar_shown = ""

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real file
        return False
