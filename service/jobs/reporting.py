"""What a job's worker events mean for Prometheus: the one event-to-metrics mapping.

The control loop calls `report_metrics` for every event a worker sends; the
metrics-overhead benchmark calls the very same function, so what it measures
is what the server does.
"""

from __future__ import annotations

from typing import Protocol

from service.protocol import (
    CheckpointSaved,
    DeviceMemory,
    EpochEnd,
    JobState,
    Progress,
    WorkerEvent,
)


class JobMetrics(Protocol):
    """The hooks of `service.metrics.ServiceMetrics` that the control loop calls."""

    def set_warm_workers(self, ready: int) -> None: ...
    def set_queue_length(self, length: int) -> None: ...
    def set_jobs_by_state(self, counts: dict[JobState, int]) -> None: ...
    def job_first_step(self, job_id: str, seconds_since_submit: float) -> None: ...
    def job_progress(
        self,
        job_id: str,
        strategy: str,
        *,
        epoch: int,
        batches: int,
        examples: int,
        loss: float,
        accuracy: float,
        examples_per_second: float,
        step_seconds: float,
    ) -> None: ...
    def job_epoch_evaluated(
        self, job_id: str, strategy: str, *, loss: float, accuracy: float
    ) -> None: ...
    def job_checkpoint_saved(self, job_id: str, strategy: str, seconds: float) -> None: ...
    def job_gpu_memory(
        self, job_id: str, strategy: str, device: str, bytes_in_use: int, peak_bytes: int
    ) -> None: ...
    def job_preempted(self, job_id: str, strategy: str) -> None: ...
    def job_finished(self, job_id: str, outcome: str, duration_seconds: float) -> None: ...


def report_metrics(metrics: JobMetrics, job_id: str, strategy: str, event: WorkerEvent) -> None:
    """Update the job's series for one worker event (other events touch no metric)."""
    if isinstance(event, Progress):
        metrics.job_progress(
            job_id,
            strategy,
            epoch=event.epoch,
            batches=event.call_steps,
            examples=event.call_examples,
            loss=event.loss,
            accuracy=event.accuracy,
            examples_per_second=event.examples_per_second,
            step_seconds=event.call_seconds / event.call_steps if event.call_steps else 0.0,
        )
    elif isinstance(event, EpochEnd):
        if event.eval_loss is not None and event.eval_accuracy is not None:
            metrics.job_epoch_evaluated(
                job_id, strategy, loss=event.eval_loss, accuracy=event.eval_accuracy
            )
    elif isinstance(event, CheckpointSaved):
        metrics.job_checkpoint_saved(job_id, strategy, event.seconds)
    elif isinstance(event, DeviceMemory):
        for device, in_use in event.bytes_in_use.items():
            peak = event.peak_bytes.get(device, in_use)
            metrics.job_gpu_memory(job_id, strategy, device, in_use, peak)
