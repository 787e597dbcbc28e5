"""Which queued job runs next, and on which devices.

Pure bookkeeping, no threads and no processes: the job manager asks
`Scheduler.next_runnable` whenever something changed (and at
`Scheduler.next_wakeup`, when waiting alone changes an answer) and starts what
it gets. Time comes from the `clock` it is given, so tests move it by hand.

Policy:
- GPU jobs get disjoint sets of GPUs (the worker sees them through
  `CUDA_VISIBLE_DEVICES`), so jobs whose devices do not overlap run at once.
- Jobs without GPUs run on the host CPU, at most `max_cpu_jobs` at a time.
- Highest priority first, then oldest, with backfill: while a job ahead waits
  for more GPUs than are free, GPU jobs behind it that fit may start. Once it
  has waited `backfill_seconds`, it holds a reservation: no job behind it
  takes a GPU until it has started, so it waits at most that long plus the
  rest of the runs already going (no starvation). CPU jobs behind it may
  always start. A job put back after a preemption goes to the front of its
  priority, and a job whose victims are stopping holds a reservation at once.
- Preemption (`preemption_victims`): for a waiting job that cannot start,
  running jobs of lower priority whose devices (or CPU slots) would let it
  start: the lowest priorities first (a priority is touched only when those
  below it cannot free enough), then the fewest victims, then the least work
  lost (steps since their last checkpoint), then the most recently started.
  The control loop asks them to checkpoint and stop.
- `mirrored` without a device count takes the most GPUs that split the global
  batch evenly with at least `MIN_EXAMPLES_PER_GPU` examples each (batch 128:
  2 GPUs; 512: 8), one GPU when no count does.
- `auto` takes one GPU. It waits up to `auto_gpu_wait_seconds` for one (a GPU
  frees within minutes on a busy host, while a whole run on the CPU can take
  hours), then takes a CPU slot if one is free.
- With `jobs_per_gpu` > 1, one-GPU jobs whose memory estimate fits a share
  (`share_bytes`) are packed, up to that many on one GPU, fullest GPU first;
  each runs under a TensorFlow memory limit of one share. Mirrored jobs and
  jobs too large for a share hold whole GPUs.
- `multi_worker` jobs run on a Ray cluster, not on this host: they hold no GPU
  or CPU slot here and start as soon as they are next in the queue's scan.
- Past `max_queue` waiting jobs, a submission is refused (RESOURCE_EXHAUSTED);
  a request for more GPUs than the host has can never run (FAILED_PRECONDITION).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from naive_model.config import shown
from service.jobs.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from service.protocol import SERVICE_STRATEGIES

# Logical CPU devices a `mirrored` job may ask for on a host without GPUs.
MAX_LOGICAL_CPUS = 16
# Replicas of a `mirrored` job on a host without GPUs when it names no count.
DEFAULT_LOGICAL_CPUS = 2
# A `mirrored` job without a count splits its batch over no more GPUs than
# leave each this many examples: smaller per-GPU batches leave a GPU idle
# between all-reduces.
MIN_EXAMPLES_PER_GPU = 64
# How long an older GPU job lets younger ones pass before it reserves GPUs.
BACKFILL_SECONDS = 600.0
# How long an `auto` job waits for a GPU before it takes a CPU slot.
AUTO_GPU_WAIT_SECONDS = 300.0
# GPUs a multi_worker job may ask of each of its hosts.
MAX_GPUS_PER_HOST = 16
# Hosts (Ray workers) a multi_worker job may ask for.
MAX_HOSTS = 1024
# Memory each process on a GPU uses outside TensorFlow's allocator (the CUDA
# context, cuBLAS and cuDNN handles), kept out of the packed jobs' shares.
CUDA_CONTEXT_BYTES = 512 * 1024**2


@dataclass(frozen=True, kw_only=True)
class Demand:
    """What a job needs from the host.

    gpus: GPUs it must hold (0 runs on the CPU); for a flexible (`auto`) job, the
    one GPU it takes when one is free.
    strategy: the strategy the worker builds: cpu, gpu or mirrored (an `auto` job
    resolves to gpu or cpu when it is placed).
    replicas: replicas the global batch is split over.
    memory_bytes: estimated device memory per GPU (model, activations, data);
    0 when unknown, which never shares a GPU.
    remote: it runs on the Ray cluster (multi_worker), holding nothing here.
    """

    strategy: str
    gpus: int = 0
    replicas: int = 1
    flexible: bool = False
    memory_bytes: int = 0
    remote: bool = False


@dataclass(frozen=True, kw_only=True)
class Assignment:
    """A job placed on devices: `gpus` are inventory indices, empty for a CPU job.

    memory_limit_bytes: the job shares its GPU and must stay under this much
    TensorFlow memory on it; 0 when it has its GPUs to itself.
    """

    job_id: str
    strategy: str
    gpus: tuple[int, ...]
    replicas: int
    memory_limit_bytes: int = 0


def demand_for(
    strategy: str,
    device_count: int,
    host_gpus: int,
    *,
    batch_size: int | None = None,
    hosts: int = 0,
    gpus_per_host: int = 0,
) -> Demand:
    """Resolve a job's strategy and device count against the host's GPU count.

    Args:
        batch_size: the job's global batch, which a `mirrored` job without a
            count is split by; None takes every GPU of the host.
        hosts, gpus_per_host: a multi_worker job's Ray workers and their GPUs.

    Raises:
        InvalidArgument: an unknown strategy or a device count it cannot take.
        FailedPrecondition: more GPUs than the host has.
    """
    if strategy == "multi_worker":
        return _multi_worker_demand(device_count, hosts, gpus_per_host)
    if hosts or gpus_per_host:
        raise InvalidArgument(
            f"strategy.hosts and strategy.gpus_per_host are for multi_worker only, got "
            f"{hosts} and {gpus_per_host} for {shown(strategy)}"
        )
    if strategy not in SERVICE_STRATEGIES:
        raise InvalidArgument(
            f"strategy.name must be one of {', '.join((*SERVICE_STRATEGIES, 'multi_worker'))}, "
            f"got {shown(strategy)}"
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
    count = device_count or default_gpu_count(batch_size, host_gpus)
    _check_gpus(count, host_gpus)
    return Demand(strategy="mirrored", gpus=count, replicas=count)


def _multi_worker_demand(device_count: int, hosts: int, gpus_per_host: int) -> Demand:
    """One replica per GPU of every host, or one per host when they run on their CPUs."""
    if device_count:
        raise InvalidArgument(
            "strategy.device_count must be 0 for multi_worker (it takes hosts and "
            f"gpus_per_host), got {device_count}"
        )
    if not 1 <= hosts <= MAX_HOSTS:
        raise InvalidArgument(
            f"strategy.hosts must be in 1..{MAX_HOSTS} for multi_worker, got {hosts}"
        )
    if not 0 <= gpus_per_host <= MAX_GPUS_PER_HOST:
        raise InvalidArgument(
            f"strategy.gpus_per_host must be in 0..{MAX_GPUS_PER_HOST} (0: each host's CPU), "
            f"got {gpus_per_host}"
        )
    return Demand(strategy="multi_worker", replicas=hosts * max(1, gpus_per_host), remote=True)


def default_gpu_count(batch_size: int | None, host_gpus: int) -> int:
    """GPUs of a `mirrored` job that names no count.

    The most GPUs, up to the host's, that divide the global batch evenly and
    leave each at least MIN_EXAMPLES_PER_GPU examples; one when no count does.
    An unknown batch takes every GPU.
    """
    if batch_size is None:
        return host_gpus
    fitting = [
        count
        for count in range(1, host_gpus + 1)
        if batch_size % count == 0 and batch_size // count >= MIN_EXAMPLES_PER_GPU
    ]
    return max(fitting, default=1)


def _check_gpus(wanted: int, host_gpus: int) -> None:
    if wanted > host_gpus:
        raise FailedPrecondition(
            f"strategy.device_count asks for {wanted} GPU{'s' if wanted != 1 else ''}, "
            f"the host has {host_gpus}"
        )


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A running job that could be preempted, and what stopping it now would cost."""

    job_id: str
    priority: int
    lost_steps: int  # steps trained since its last checkpoint
    started: float  # when its run started, by the scheduler's clock


@dataclass
class _Waiting:
    demand: Demand
    since: float  # when it was queued, by the scheduler's clock
    priority: int
    order: int  # its place among jobs of its priority: smaller first
    reserved: bool = False  # its victims are stopping: nothing behind it takes a GPU


class Scheduler:
    """Oldest-first queue with bounded backfill over a fixed set of GPUs and CPU slots.

    Args:
        gpu_indices: the GPUs to hand out (inventory indices).
        jobs_per_gpu: one-GPU jobs packed on one GPU at most (1: no packing).
        gpu_memory_bytes: memory of the smallest GPU; needed to pack.
        backfill_seconds: how long an older GPU job lets younger ones pass.
        auto_gpu_wait_seconds: how long an `auto` job waits for a GPU before the CPU.
        clock: monotonic seconds.

    Raises:
        ValueError: a bound out of range, or packing without the GPUs' memory.
    """

    def __init__(
        self,
        gpu_indices: Sequence[int],
        *,
        max_cpu_jobs: int = 1,
        max_queue: int = 64,
        jobs_per_gpu: int = 1,
        gpu_memory_bytes: int = 0,
        backfill_seconds: float = BACKFILL_SECONDS,
        auto_gpu_wait_seconds: float = AUTO_GPU_WAIT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_cpu_jobs < 1:
            raise ValueError(f"max_cpu_jobs must be at least 1, got {max_cpu_jobs}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if jobs_per_gpu < 1:
            raise ValueError(f"jobs_per_gpu must be at least 1, got {jobs_per_gpu}")
        if backfill_seconds < 0 or auto_gpu_wait_seconds < 0:
            raise ValueError(
                "backfill_seconds and auto_gpu_wait_seconds must be 0 or positive, got "
                f"{backfill_seconds} and {auto_gpu_wait_seconds}"
            )
        self.share_bytes = 0
        if jobs_per_gpu > 1 and gpu_indices:
            self.share_bytes = (gpu_memory_bytes - jobs_per_gpu * CUDA_CONTEXT_BYTES) // (
                jobs_per_gpu
            )
            if self.share_bytes <= 0:
                raise ValueError(
                    f"jobs_per_gpu {jobs_per_gpu} needs the GPUs' memory to size each job's "
                    f"share, and {gpu_memory_bytes / 1024**3:.1f} GiB leaves none "
                    f"(0 means nvidia-smi did not report it)"
                )
        self._all_gpus = tuple(sorted(gpu_indices))
        self._jobs_per_gpu = jobs_per_gpu
        self._slots_used = dict.fromkeys(self._all_gpus, 0)  # a whole GPU uses every slot
        self._max_cpu_jobs = max_cpu_jobs
        self._max_queue = max_queue
        self._backfill_seconds = backfill_seconds
        self._auto_gpu_wait_seconds = auto_gpu_wait_seconds
        self._clock = clock
        self._queue: dict[str, _Waiting] = {}
        self._running: dict[str, Assignment] = {}
        self._next_order = 0

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> dict[str, Assignment]:
        return dict(self._running)

    @property
    def free_gpus(self) -> tuple[int, ...]:
        """GPUs no job holds or shares."""
        return tuple(index for index, used in self._slots_used.items() if not used)

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

    def enqueue(
        self, job_id: str, demand: Demand, *, priority: int = 0, front: bool = False
    ) -> None:
        """Queue a job behind those of its priority (`front`: ahead of them); admission first."""
        self.check_admission(demand)
        if job_id in self._queue or job_id in self._running:
            raise ValueError(f"job {job_id} is already queued or running")
        self._next_order += 1
        order = -self._next_order if front else self._next_order
        self._queue[job_id] = _Waiting(demand, self._clock(), priority, order)

    @property
    def waiting(self) -> list[str]:
        """The queued jobs in the order they are considered: priority, then place."""
        return sorted(self._queue, key=lambda job_id: self._rank(self._queue[job_id]))

    @staticmethod
    def _rank(waiting: _Waiting) -> tuple[int, int]:
        return (-waiting.priority, waiting.order)

    def reserve(self, job_id: str) -> None:
        """Hold GPUs for a waiting job from now on (its victims are stopping)."""
        self._queue[job_id].reserved = True

    def remove(self, job_id: str) -> bool:
        """Take a waiting job out of the queue; False when it was not waiting."""
        return self._queue.pop(job_id, None) is not None

    def release(self, job_id: str) -> None:
        """Give back the devices of a job that ended."""
        assignment = self._running.pop(job_id, None)
        if assignment is not None:
            for index in assignment.gpus:
                self._slots_used[index] -= self._slots(assignment)

    def next_runnable(self) -> list[Assignment]:
        """Place every waiting job that can start now, in priority order."""
        now = self._clock()
        started: list[Assignment] = []
        reserved = False  # a GPU job ahead waited past its backfill: GPUs are kept for it
        for job_id in self.waiting:
            waiting = self._queue[job_id]
            demand, waited = waiting.demand, now - waiting.since
            assignment = None
            if demand.remote:  # on the Ray cluster: nothing of this host to wait for
                assignment = Assignment(
                    job_id=job_id, strategy=demand.strategy, gpus=(), replicas=demand.replicas
                )
            elif demand.gpus and not reserved:
                assignment = self._place_on_gpus(job_id, demand)
            if assignment is None and self._cpu_jobs() < self._max_cpu_jobs:
                if not demand.gpus or (demand.flexible and waited >= self._auto_gpu_wait_seconds):
                    strategy = "cpu" if demand.flexible else demand.strategy
                    assignment = Assignment(
                        job_id=job_id, strategy=strategy, gpus=(), replicas=demand.replicas
                    )
            if assignment is None:
                if demand.gpus and (
                    waiting.reserved or (not demand.flexible and waited >= self._backfill_seconds)
                ):
                    reserved = True
                continue
            del self._queue[job_id]
            self._running[job_id] = assignment
            for index in assignment.gpus:
                self._slots_used[index] += self._slots(assignment)
            started.append(assignment)
        return started

    def next_wakeup(self) -> float | None:
        """When waiting alone next lets a job start (an `auto` job's wait for a GPU ends).

        In the clock's seconds; None when no waiting job's chances change with time.
        Backfill needs no wake-up: a reservation only ever holds jobs back.
        """
        now = self._clock()
        ends = [
            waiting.since + self._auto_gpu_wait_seconds
            for waiting in self._queue.values()
            if waiting.demand.flexible and waiting.since + self._auto_gpu_wait_seconds > now
        ]
        return min(ends, default=None)

    def preemption_victims(
        self, job_id: str, candidates: Sequence[Candidate], *, max_sets: int = 20_000
    ) -> list[str]:
        """The running jobs to stop so that waiting `job_id` can start; [] when none would do.

        Only candidates of lower priority than the job, running on this host.
        The lowest priorities are drawn on first: jobs of a priority are
        victims only when those below it cannot free enough. Among those, the
        fewest victims; among sets of one size, in order of least work lost,
        then most recently started. At most `max_sets` sets are tried.
        """
        waiting = self._queue[job_id]
        eligible = sorted(
            (
                candidate
                for candidate in candidates
                if candidate.priority < waiting.priority
                and candidate.job_id in self._running
                and self._running[candidate.job_id].strategy != "multi_worker"
            ),
            key=lambda c: (c.priority, c.lost_steps, -c.started),
        )
        tried = 0
        for ceiling in sorted({candidate.priority for candidate in eligible}):
            pool = [candidate for candidate in eligible if candidate.priority <= ceiling]
            if not self._fits_without(waiting.demand, {c.job_id for c in pool}):
                continue  # not even all of them free enough: draw on the next priority
            for size in range(1, len(pool) + 1):
                for victims in itertools.combinations(pool, size):
                    if self._fits_without(waiting.demand, {c.job_id for c in victims}):
                        return [c.job_id for c in victims]
                    tried += 1
                    if tried >= max_sets:
                        return [c.job_id for c in pool]  # enough, if not the fewest
        return []

    def _fits_without(self, demand: Demand, victims: set[str]) -> bool:
        """Whether `demand` could start were `victims` gone."""
        freed = [self._running[job_id] for job_id in victims]
        if not demand.gpus or (demand.flexible and not self._all_gpus):
            cpu_jobs = self._cpu_jobs() - sum(1 for a in freed if not a.gpus)
            return cpu_jobs < self._max_cpu_jobs
        used = dict(self._slots_used)
        for assignment in freed:
            for index in assignment.gpus:
                used[index] -= self._slots(assignment)
        if self._shares(demand):
            return any(slots < self._jobs_per_gpu for slots in used.values())
        return sum(1 for slots in used.values() if not slots) >= max(demand.gpus, 1)

    def _place_on_gpus(self, job_id: str, demand: Demand) -> Assignment | None:
        if self._shares(demand):
            partly_used = [
                index for index, used in self._slots_used.items() if 0 < used < self._jobs_per_gpu
            ]
            # The fullest shared GPU first, so whole GPUs stay free for large jobs.
            candidates = sorted(partly_used, key=lambda index: -self._slots_used[index])
            candidates += list(self.free_gpus)
            if not candidates:
                return None
            return Assignment(
                job_id=job_id,
                strategy=demand.strategy,
                gpus=(candidates[0],),
                replicas=demand.replicas,
                memory_limit_bytes=self.share_bytes,
            )
        free = self.free_gpus
        if len(free) < demand.gpus:
            return None
        return Assignment(
            job_id=job_id,
            strategy=demand.strategy,
            gpus=free[: demand.gpus],
            replicas=demand.replicas,
        )

    def _shares(self, demand: Demand) -> bool:
        """Whether the job may share a GPU: packing is on and it fits a share."""
        return (
            self._jobs_per_gpu > 1
            and demand.gpus == 1
            and demand.strategy == "gpu"
            and 0 < demand.memory_bytes <= self.share_bytes
        )

    def _slots(self, assignment: Assignment) -> int:
        return 1 if assignment.memory_limit_bytes else self._jobs_per_gpu

    def _cpu_jobs(self) -> int:
        return sum(
            1
            for assignment in self._running.values()
            if not assignment.gpus and assignment.strategy != "multi_worker"
        )
