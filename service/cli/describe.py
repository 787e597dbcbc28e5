"""`ntrain describe JOB`: one job in full, as text a person reads top to bottom."""

from __future__ import annotations

from ntrain.v1 import training_pb2

from service.cli.inputs import format_layers
from service.cli.output import (
    format_bytes,
    format_percent,
    format_result,
    format_table,
    format_time,
    plural,
    state_name,
)
from service.protocol import PRIORITY_CLASSES


def priority_name(priority: int) -> str:
    """The class a priority is ("high (100)"), or the number alone."""
    for name, value in PRIORITY_CLASSES.items():
        if value == priority:
            return f"{name} ({priority})"
    return str(priority)


def describe_job(job: training_pb2.Job) -> str:
    """The job's spec, owner, state and every transition with its reason, progress,
    result, devices, restarts and model, in sections."""
    spec = job.spec
    lines = [
        f"job          {job.job_id}",
        f"name         {spec.name or '-'}",
        f"labels       {_labels(spec.labels)}",
        f"owner        {job.owner or '- (submitted without authentication)'}",
        f"state        {state_name(job.state)}",
        f"created      {format_time(job.create_time)}",
    ]
    if job.request_id:
        lines.append(f"request id   {job.request_id}")
    if job.failure_reason:
        lines.append(f"failed       {' '.join(job.failure_reason.split())}")
    lines += [
        f"strategy     {job.strategy or spec.strategy.name or 'auto'}"
        + (f" on {', '.join(job.devices)}" if job.devices else ""),
        f"priority     {priority_name(spec.priority)}",
        f"restarts     {job.restarts} of at most {spec.max_restarts}",
        f"preemptions  {job.preemptions}",
        "",
        "spec:",
        f"  data set     {spec.dataset}",
        f"  layers       {format_layers(spec.layers)} ({spec.initializer} initialiser)",
        f"  optimizer    {spec.optimizer.name}, learning rate {spec.optimizer.learning_rate:g}"
        + (f", momentum {spec.optimizer.momentum:g}" if spec.optimizer.momentum else ""),
        f"  training     {plural(spec.epochs, 'epoch')}, batch {spec.batch_size}, "
        f"{_steps_per_call(spec.steps_per_execution)}, {spec.precision or 'float32'}"
        + (", XLA" if spec.jit_compile else "")
        + f", seed {spec.seed}",
        f"  strategy     {spec.strategy.name or 'auto'}, "
        + (
            plural(spec.strategy.device_count, "device")
            if spec.strategy.device_count
            else "its default device count"
        ),
        f"  checkpoints  {_checkpoints(spec.checkpoint_every_epochs)}",
        "  time limit   "
        + (f"{spec.max_runtime_seconds:g} s" if spec.max_runtime_seconds else "none"),
        "",
        "transitions:",
    ]
    rows = [
        (f"  {format_time(t.time)}", state_name(t.state), " ".join(t.reason.split()))
        for t in job.transitions
    ]
    lines.append(format_table(("  TIME", "STATE", "REASON"), rows))
    if job.HasField("progress"):
        progress = job.progress
        lines += [
            "",
            f"progress:    epoch {progress.epoch}/{progress.epochs}, step "
            f"{progress.step_in_epoch}/{progress.steps_per_epoch} of the epoch "
            f"({progress.step} in all), loss {progress.loss:.4f}, accuracy "
            f"{format_percent(progress.accuracy)}, {progress.examples_per_second:,.0f} examples/s",
        ]
    if job.HasField("result"):
        lines += ["", f"result:      {format_result(job.result)}"]
    lines += ["", *_model(job)]
    return "\n".join(lines)


def _labels(labels) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(labels.items())) or "-"


def _steps_per_call(steps: int) -> str:
    return "a whole epoch per compiled call" if not steps else f"{steps} steps per compiled call"


def _checkpoints(every: int) -> str:
    if every == 0:
        return "at the end only"
    return "every epoch" if every == 1 else f"every {every} epochs"


def _model(job: training_pb2.Job) -> list[str]:
    if not job.HasField("model"):
        return ["model:       none yet (training has not started)"]
    model = job.model
    exported = (
        f"exported to {model.path} (signature {model.signature}: inputs float32 "
        f"[None, {model.input_size}] -> probabilities [None, {model.num_classes}]); "
        f"ntrain model {job.job_id} -o DIR downloads it"
        if model.exported
        else "not exported (a model is exported when the job SUCCEEDS)"
    )
    return [
        f"model:       {model.input_size} inputs -> {format_layers(model.layers)}, "
        f"{model.num_classes} classes, {model.parameters:,} parameters "
        f"({format_bytes(4 * model.parameters)} of float32)",
        f"             {exported}",
    ]
