"""Which queued job runs next, and on which devices.

Pure bookkeeping, no threads and no processes: the job manager asks
`Scheduler.next_runnable` whenever something changed and starts what it gets.

Policy:
- GPU jobs get disjoint sets of GPU indices (the worker sees them through
  `CUDA_VISIBLE_DEVICES`), so jobs whose devices do not overlap run at once.
- Jobs without GPUs run on the host CPU, at most `max_cpu_jobs` at a time.
- The queue is FIFO per resource: once the oldest waiting GPU job cannot start,
  no younger GPU job overtakes it (so a large request is not starved by small
  ones), while CPU jobs behind it may still start, and the other way round.
- `auto` jobs take one GPU when one is free (and no older GPU job waits), else a
  CPU slot.
- Past `max_queue` waiting jobs, a submission is refused (RESOURCE_EXHAUSTED);
  a request for more GPUs than the host has can never run (FAILED_PRECONDITION).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from naive_model.config import shown
from service.jobs.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from service.protocol import SERVICE_STRATEGIES

# Logical CPU devices a `mirrored` job may ask for on a host without GPUs.
MAX_LOGICAL_CPUS = 16
# Replicas of a `mirrored` job on a host without GPUs when it names no count.
DEFAULT_LOGICAL_CPUS = 2


@dataclass(frozen=True, kw_only=True)
class Demand:
    """What a job needs from the host.

    gpus: GPUs it must hold (0 runs on the CPU); for a flexible (`auto`) job, the
    one GPU it takes when one is free.
    strategy: the strategy the worker builds: cpu, gpu or mirrored (an `auto` job
    resolves to gpu or cpu when it is placed).
    replicas: replicas the global batch is split over.
    """

    strategy: str
    gpus: int = 0
    replicas: int = 1
    flexible: bool = False


@dataclass(frozen=True, kw_only=True)
class Assignment:
    """A job placed on devices: `gpus` are host GPU indices, empty for a CPU job."""

    job_id: str
    strategy: str
    gpus: tuple[int, ...]
    replicas: int

    @property
    def devices(self) -> tuple[str, ...]:
        if self.gpus:
            return tuple(f"GPU:{index}" for index in self.gpus)
        return ("CPU:0",)

    @property
    def cuda_visible_devices(self) -> str:
        """The value of CUDA_VISIBLE_DEVICES for the worker ("" hides every GPU)."""
        return ",".join(str(index) for index in self.gpus)


def demand_for(strategy: str, device_count: int, host_gpus: int) -> Demand:
    """Resolve a job's strategy and device count against the host's GPU count.

    Raises:
        InvalidArgument: an unknown strategy or a device count it cannot take.
        FailedPrecondition: more GPUs than the host has.
    """
    if strategy == "multi_worker":
        raise InvalidArgument(
            "strategy.name 'multi_worker' is for library users; the service runs each job "
            "on one host: use auto, cpu, gpu or mirrored"
        )
    if strategy not in SERVICE_STRATEGIES:
        raise InvalidArgument(
            f"strategy.name must be one of {', '.join(SERVICE_STRATEGIES)}, got {shown(strategy)}"
        )
    if device_count < 0:
        raise InvalidArgument(
            f"strategy.device_count must be 0 (the strategy's default) or positive, "
            f"got {device_count}"
        )
    if strategy in ("cpu", "gpu") and device_count > 1:
        raise InvalidArgument(
            f"strategy.device_count must be 0 or 1 for {strategy} (use mirrored for "
            f"several devices), got {device_count}"
        )
    if strategy == "auto" and device_count > 1:
        strategy = "mirrored"
    if strategy == "cpu":
        return Demand(strategy="cpu")
    if strategy == "gpu":
        _check_gpus(1, host_gpus)
        return Demand(strategy="gpu", gpus=1)
    if strategy == "auto":
        if host_gpus == 0:
            return Demand(strategy="cpu")
        return Demand(strategy="gpu", gpus=1, flexible=True)
    # mirrored: over GPUs when the host has them, else over logical CPU devices.
    if host_gpus == 0:
        count = device_count or DEFAULT_LOGICAL_CPUS
        if count > MAX_LOGICAL_CPUS:
            raise InvalidArgument(
                f"strategy.device_count must be at most {MAX_LOGICAL_CPUS} logical CPU "
                f"devices on a host without GPUs, got {count}"
            )
        return Demand(strategy="mirrored", replicas=count)
    count = device_count or host_gpus
    _check_gpus(count, host_gpus)
    return Demand(strategy="mirrored", gpus=count, replicas=count)


def _check_gpus(wanted: int, host_gpus: int) -> None:
    if wanted > host_gpus:
        raise FailedPrecondition(
            f"strategy.device_count asks for {wanted} GPU{'s' if wanted != 1 else ''}, "
            f"the host has {host_gpus}"
        )


class Scheduler:
    """FIFO queue over a fixed set of GPUs and a number of CPU slots."""

    def __init__(self, gpu_indices: Sequence[int], *, max_cpu_jobs: int = 1, max_queue: int = 64):
        if max_cpu_jobs < 1:
            raise ValueError(f"max_cpu_jobs must be at least 1, got {max_cpu_jobs}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self._all_gpus = tuple(sorted(gpu_indices))
        self._free_gpus = set(self._all_gpus)
        self._max_cpu_jobs = max_cpu_jobs
        self._max_queue = max_queue
        self._queue: OrderedDict[str, Demand] = OrderedDict()
        self._running: dict[str, Assignment] = {}

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> dict[str, Assignment]:
        return dict(self._running)

    @property
    def free_gpus(self) -> tuple[int, ...]:
        return tuple(sorted(self._free_gpus))

    def check_admission(self, demand: Demand) -> None:
        """Raise if a job with `demand` could not be queued now.

        Raises:
            FailedPrecondition: it asks for more GPUs than the host has.
            ResourceExhausted: the queue is full.
        """
        if not demand.flexible:
            _check_gpus(demand.gpus, len(self._all_gpus))
        if len(self._queue) >= self._max_queue:
            raise ResourceExhausted(
                f"the queue is full ({self._max_queue} jobs waiting); retry when jobs finish"
            )

    def enqueue(self, job_id: str, demand: Demand) -> None:
        """Queue a job at the back; `check_admission` first."""
        self.check_admission(demand)
        if job_id in self._queue or job_id in self._running:
            raise ValueError(f"job {job_id} is already queued or running")
        self._queue[job_id] = demand

    def remove(self, job_id: str) -> bool:
        """Take a waiting job out of the queue; False when it was not waiting."""
        return self._queue.pop(job_id, None) is not None

    def release(self, job_id: str) -> None:
        """Give back the devices of a job that ended."""
        assignment = self._running.pop(job_id, None)
        if assignment is not None:
            self._free_gpus.update(assignment.gpus)

    def next_runnable(self) -> list[Assignment]:
        """Place every waiting job that can start now, oldest first."""
        started: list[Assignment] = []
        gpu_blocked = False  # an older GPU job is waiting: younger ones may not overtake
        for job_id, demand in list(self._queue.items()):
            assignment = None
            if demand.gpus and not gpu_blocked and len(self._free_gpus) >= demand.gpus:
                gpus = tuple(sorted(self._free_gpus)[: demand.gpus])
                assignment = Assignment(
                    job_id=job_id, strategy=demand.strategy, gpus=gpus, replicas=demand.replicas
                )
            elif (demand.flexible or not demand.gpus) and self._cpu_jobs() < self._max_cpu_jobs:
                strategy = "cpu" if demand.flexible else demand.strategy
                assignment = Assignment(
                    job_id=job_id, strategy=strategy, gpus=(), replicas=demand.replicas
                )
            elif demand.gpus and not demand.flexible:
                gpu_blocked = True
            if assignment is None:
                continue
            del self._queue[job_id]
            self._running[job_id] = assignment
            self._free_gpus.difference_update(assignment.gpus)
            started.append(assignment)
        return started

    def _cpu_jobs(self) -> int:
        return sum(1 for assignment in self._running.values() if not assignment.gpus)
