"""Makes the runner of each placed job: a worker on this host, or a Ray job.

The control loop decides that a job starts and where; `Launcher` turns the
scheduler's assignment into the runner's task (devices, data, checkpoints)
and the runner itself, so the loop never knows which kind it holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.devices import DeviceInventory
from service.jobs.controller import Placement
from service.jobs.dataset_store import DatasetStore
from service.jobs.local_runner import LocalRunner
from service.jobs.ray_jobs import RayJobsClient, RayJobsError
from service.jobs.ray_runner import STORED_EVENTS, RayRunner
from service.jobs.runner import OnEnd, OnEvent, Runner
from service.jobs.scheduler import Assignment
from service.jobs.store import JobRecord, Store
from service.processes.warm_pool import WorkerPool
from service.protocol import RayTrainTask, TrainTask

log = logging.getLogger(__name__)


class Launcher:
    """The `RunnerFactory` of a server: local jobs take workers from `pool`, others go to `ray`."""

    def __init__(
        self,
        store: Store,
        *,
        inventory: DeviceInventory,
        pool: WorkerPool,
        data_dir: Path | None,
        checkpoint_seconds: float | None,
        ray: RayJobsClient | None,
        heartbeat_seconds: float = 0.0,
        datasets: DatasetStore | None = None,
        data_budget_bytes: int = 0,
    ):
        self.store = store
        self.inventory = inventory
        self.pool = pool
        self.data_dir = data_dir
        self.checkpoint_seconds = checkpoint_seconds
        self.ray = ray
        self.heartbeat_seconds = heartbeat_seconds
        self.datasets = datasets
        self.data_budget_bytes = data_budget_bytes

    def _dataset_dir(self, record: JobRecord) -> Path | None:
        """The canonical folder of the pushed data set version the job is pinned to."""
        if self.datasets is None or not record.spec.dataset_version:
            return None
        return self.datasets.resolve(record.spec.dataset_version).folder

    def placement(self, record: JobRecord, assignment: Assignment) -> Placement:
        if assignment.strategy == "multi_worker":
            where = self.ray.address if self.ray else "?"
            spec = record.spec
            return Placement(
                f"on Ray at {where}, {spec.hosts} host(s), {spec.gpus_per_host} GPU(s) each", ()
            )
        devices = self.inventory.device_names(assignment.gpus)
        shared = ""
        if assignment.memory_limit_bytes:
            shared = f" (shared, {assignment.memory_limit_bytes / 1024**3:.1f} GiB limit)"
        return Placement(f"on {', '.join(devices)}{shared}", devices)

    def runner(
        self, record: JobRecord, assignment: Assignment, on_event: OnEvent, on_end: OnEnd
    ) -> Runner:
        if assignment.strategy == "multi_worker":
            return self._ray_runner(record, on_event, on_end)
        task = TrainTask(
            job_id=record.job_id,
            job_dir=self.store.job_dir(record.job_id),
            spec=record.spec,
            strategy=assignment.strategy,
            replicas=assignment.replicas,
            cuda_visible_devices=self.inventory.cuda_visible_devices(assignment.gpus),
            gpu_names=self.inventory.device_names(assignment.gpus) if assignment.gpus else (),
            data_dir=self.data_dir,
            checkpoint_seconds=self.checkpoint_seconds,
            gpu_memory_limit_mb=assignment.memory_limit_bytes // 1024**2,
            heartbeat_seconds=self.heartbeat_seconds,
            dataset_dir=self._dataset_dir(record),
            data_budget_bytes=self.data_budget_bytes,
        )
        return LocalRunner(task, take_worker=self.pool.take, on_event=on_event, on_end=on_end)

    def _ray_runner(self, record: JobRecord, on_event: OnEvent, on_end: OnEnd) -> RayRunner:
        """A runner that submits the job to Ray, or follows its Ray job again."""
        assert self.ray is not None  # validation refuses multi_worker jobs without Ray
        job_dir = self.store.job_dir(record.job_id).resolve()
        task = RayTrainTask(
            job_id=record.job_id,
            job_dir=job_dir,
            spec=record.spec,
            hosts=record.spec.hosts,
            gpus_per_host=record.spec.gpus_per_host,
            data_dir=None if self.data_dir is None else self.data_dir.resolve(),
            storage_path=job_dir / "ray",
            dataset_dir=self._dataset_dir(record),
            data_budget_bytes=self.data_budget_bytes,
        )
        return RayRunner(
            task,
            client=self.ray,
            on_event=on_event,
            on_end=on_end,
            stored_events=self._stored_events(record.job_id),
            log_path=self.store.job_files(record.job_id).train_log,
        )

    def _stored_events(self, job_id: str) -> int:
        """How many of the job's events a runner forwarded into the store so far."""
        count, last = 0, 0
        while events := self.store.events_after(job_id, last):
            count += sum(1 for event in events if isinstance(event.payload, STORED_EVENTS))
            last = events[-1].sequence
        return count

    def abandon(self, record: JobRecord) -> None:
        if record.spec.strategy == "multi_worker" and self.ray is not None:
            try:
                self.ray.stop(record.job_id)
            except RayJobsError as error:
                log.warning("could not stop the Ray job %s: %s", record.job_id, error)
