"""Text the ntrain command line prints: tables, job summaries, digits as ASCII art.

Pure functions from protobuf messages (or plain values) to strings, so the
command line and the demo print the same things and tests can check them
without a server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf import json_format
from ntrain.v1 import training_pb2

from naive_model.results import steps_timed
from ntrain.client.states import state_name  # noqa: F401  (the CLI's name for it)

# Dark to bright; a pixel in [0, 1] picks one.
_ASCII_RAMP = " .:-=+*#%@"


def format_time(timestamp) -> str:
    """A protobuf Timestamp in local time with its zone ('2026-11-29 12:30:05 UTC'), or '-'."""
    if not timestamp.seconds and not timestamp.nanos:
        return "-"
    local = datetime.fromtimestamp(timestamp.seconds, tz=UTC).astimezone()
    return local.strftime("%Y-%m-%d %H:%M:%S %Z").rstrip()


def format_percent(fraction: float) -> str:
    """Accuracy and other fractions, everywhere the command line prints them: '92.42%'."""
    return f"{100 * fraction:.2f}%"


def plural(count: int, noun: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, headers first."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    return "\n".join(lines)


def to_json(message) -> str:
    """A protobuf message (or a list of them) as indented JSON with proto field names."""
    if isinstance(message, list):
        return json.dumps([_to_dict(item) for item in message], indent=2)
    return json.dumps(_to_dict(message), indent=2)


def _to_dict(message) -> dict:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def describe_layers(spec: training_pb2.JobSpec) -> str:
    """'512 relu, 10 softmax' as a compact '512-10'."""
    return "-".join(str(layer.units) for layer in spec.layers) or "-"


def job_accuracy(job: training_pb2.Job) -> str:
    """The test accuracy of a finished job, else the latest training accuracy."""
    if job.HasField("result") and (job.result.test_accuracy or job.result.test_loss):
        return format_percent(job.result.test_accuracy)
    if job.HasField("progress") and job.progress.step:
        return format_percent(job.progress.accuracy) + " (train)"
    return "-"


def job_epoch(job: training_pb2.Job) -> str:
    epochs = job.spec.epochs
    if job.HasField("progress") and job.progress.step:
        return f"{job.progress.epoch}/{epochs}"
    return f"-/{epochs}"


def jobs_table(jobs: Sequence[training_pb2.Job]) -> str:
    headers = (
        "JOB", "STATE", "CREATED", "DATASET", "LAYERS", "EPOCH", "ACCURACY", "STRATEGY", "OWNER"
    )  # fmt: skip
    rows = [
        (
            job.job_id,
            state_name(job.state),
            format_time(job.create_time),
            job.spec.dataset,
            describe_layers(job.spec),
            job_epoch(job),
            job_accuracy(job),
            job.strategy or job.spec.strategy.name or "auto",
            job.owner or "-",  # "-": submitted without authentication
        )
        for job in jobs
    ]
    return format_table(headers, rows)


def format_state_change(change: training_pb2.StateTransition) -> str:
    line = f"{format_time(change.time)}  {state_name(change.state)}"
    return f"{line}: {change.reason}" if change.reason else line


def format_result(result: training_pb2.JobResult) -> str:
    """One line: test accuracy first, then how the training went.

    After a resume the seconds are the last run's, so its steps are named with them.
    """
    steps = steps_timed(result.steps, result.run_steps or None)  # 0: an older server's
    return (
        f"test accuracy {format_percent(result.test_accuracy)} (loss {result.test_loss:.4f}); "
        f"train accuracy {format_percent(result.train_accuracy)} (loss {result.train_loss:.4f}); "
        f"{steps} {result.train_seconds:.1f} s, {result.examples_per_second:,.0f} examples/s"
    )


def format_evaluation(job_id: str, response: training_pb2.EvaluateResponse) -> str:
    return (
        f"job {job_id} on {response.dataset or 'its data set'} ({response.source or 'model'}): "
        f"accuracy {format_percent(response.accuracy)}, loss {response.loss:.4f}, "
        f"{response.examples:,} examples"
    )


def format_server_info(info: training_pb2.ServerInfo) -> str:
    lines = [
        f"version            {info.version}",
        f"tensorflow         {info.tensorflow_version or '-'}",
        f"python             {info.python_version or '-'}",
        f"strategies         {', '.join(info.strategies) or '-'}",
        f"queue length       {info.queue_length}",
        f"running jobs       {info.running_jobs}",
        f"warm workers       {info.warm_workers}",
        "devices:",
    ]
    rows = [
        (
            device.name,
            device.kind,
            format_bytes(device.memory_bytes),
            "busy" if device.busy else "free",
            device.description,
        )
        for device in info.devices
    ]
    table = format_table(
        ("  NAME", "KIND", "MEMORY", "STATE", "DESCRIPTION"),
        [("  " + row[0], *row[1:]) for row in rows],
    )
    return "\n".join(lines) + "\n" + table


def format_bytes(count: int) -> str:
    if not count:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def ascii_image(pixels: Sequence[float]) -> list[str] | None:
    """A square image (values in [0, 1]) as text, two pixel rows per text row.

    Characters are about twice as tall as they are wide, so averaging row
    pairs keeps a digit's proportions. Returns None when the input is not square.
    """
    side = math.isqrt(len(pixels))
    if side < 2 or side * side != len(pixels):
        return None
    rows = []
    for top in range(0, side, 2):
        row = []
        for column in range(side):
            values = [pixels[r * side + column] for r in (top, top + 1) if r < side]
            value = min(max(sum(values) / len(values), 0.0), 1.0)
            row.append(_ASCII_RAMP[min(int(value * len(_ASCII_RAMP)), len(_ASCII_RAMP) - 1)])
        rows.append("".join(row))
    return rows


def prediction_caption(
    prediction: training_pb2.Prediction, true_label: int | None = None
) -> list[str]:
    probability = max(prediction.probabilities) if prediction.probabilities else 0.0
    caption = [f"predicted {prediction.label}  ({format_percent(probability)})"]
    if true_label is not None:
        verdict = "right" if true_label == prediction.label else "WRONG"
        caption.append(f"true label {true_label}  {verdict}")
    return caption


def image_beside_caption(art: list[str], caption: list[str], gap: str = "   ") -> str:
    """The picture on the left, the caption vertically centred on its right."""
    width = max(len(row) for row in art)
    start = max((len(art) - len(caption)) // 2, 0)
    lines = []
    for index, row in enumerate(art):
        text = caption[index - start] if 0 <= index - start < len(caption) else ""
        lines.append(f"|{row.ljust(width)}|{gap}{text}".rstrip())
    return "\n".join(lines)


def predictions_table(
    predictions: Sequence[training_pb2.Prediction], labels: Sequence[int] | None = None
) -> str:
    headers = ["#", "PREDICTED", "PROBABILITY"] + (["LABEL", ""] if labels is not None else [])
    rows = []
    for index, prediction in enumerate(predictions):
        probability = max(prediction.probabilities) if prediction.probabilities else 0.0
        row = [index, prediction.label, format_percent(probability)]
        if labels is not None:
            row += [labels[index], "" if labels[index] == prediction.label else "wrong"]
        rows.append(row)
    return format_table(headers, rows)


def datasets_table(datasets: Sequence[training_pb2.Dataset]) -> str:
    rows = [
        (
            dataset.name,
            dataset.digest.removeprefix("sha256:")[:12],
            dataset.format,
            f"{dataset.num_train}+{dataset.num_test}",
            dataset.input_size,
            dataset.num_classes,
            format_bytes(dataset.size_bytes),
            dataset.owner or "-",
            format_time(dataset.create_time),
        )
        for dataset in datasets
    ]
    headers = ("NAME", "DIGEST", "FORMAT", "ROWS", "FEATURES", "CLASSES", "SIZE", "OWNER", "PUSHED")
    return format_table(headers, rows)


def describe_dataset(dataset: training_pb2.Dataset) -> str:
    split = (
        f"a seeded {format_percent(dataset.test_fraction)} of the rows"
        if dataset.test_fraction
        else "the file's own"
    )
    lines = [
        f"{dataset.name}@{dataset.digest}",
        f"  format        {dataset.format}"
        + (f", label column {dataset.label_column!r}" if dataset.label_column else ""),
        f"  rows          {dataset.num_train} train, {dataset.num_test} test ({split})",
        f"  features      {dataset.input_size} {dataset.feature_dtype}",
        f"  classes       {dataset.num_classes}",
        f"  size          {format_bytes(dataset.size_bytes)} pushed, "
        f"{format_bytes(dataset.stored_bytes)} stored",
        f"  owner         {dataset.owner or '-'}",
        f"  pushed        {format_time(dataset.create_time)}",
    ]
    return "\n".join(lines)
