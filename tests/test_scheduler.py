"""The scheduler over a faked inventory: disjoint GPU sets, FIFO, limits, refusals."""

from __future__ import annotations

import pytest

from service.devices import DeviceInventory, fake_gpus
from service.jobs.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from service.jobs.scheduler import Demand, Scheduler, demand_for

FOUR_GPUS = [0, 1, 2, 3]
INVENTORY = DeviceInventory(gpus=fake_gpus(4))


def mirrored(gpus: int) -> Demand:
    return demand_for("mirrored", gpus, host_gpus=len(FOUR_GPUS))


def test_two_2_gpu_jobs_run_at_once_on_disjoint_devices_and_a_third_waits():
    scheduler = Scheduler(FOUR_GPUS)
    for job in ("a", "b", "c"):
        scheduler.enqueue(job, mirrored(2))

    started = scheduler.next_runnable()

    assert [a.job_id for a in started] == ["a", "b"]
    first, second = (set(a.gpus) for a in started)
    assert len(first) == len(second) == 2 and not first & second
    assert {INVENTORY.cuda_visible_devices(a.gpus) for a in started} == {"0,1", "2,3"}
    assert scheduler.queue_length == 1 and scheduler.next_runnable() == []

    scheduler.release("a")
    (third,) = scheduler.next_runnable()
    assert third.job_id == "c" and set(third.gpus) == first
    assert third.strategy == "mirrored" and third.replicas == 2


def test_a_5_gpu_job_is_refused_on_4_gpus():
    with pytest.raises(FailedPrecondition, match="5 GPUs, the host has 4"):
        demand_for("mirrored", 5, host_gpus=4)
    scheduler = Scheduler(FOUR_GPUS)
    with pytest.raises(FailedPrecondition):
        scheduler.enqueue("big", Demand(strategy="mirrored", gpus=5, replicas=5))
    assert scheduler.queue_length == 0


def test_queue_overflow_is_refused():
    scheduler = Scheduler(FOUR_GPUS, max_queue=2)
    scheduler.enqueue("a", mirrored(4))
    assert [a.job_id for a in scheduler.next_runnable()] == ["a"]  # running, not queued
    scheduler.enqueue("b", mirrored(4))
    scheduler.enqueue("c", mirrored(1))
    with pytest.raises(ResourceExhausted, match="queue is full"):
        scheduler.enqueue("d", mirrored(1))
    assert scheduler.queue_length == 2


def test_cpu_jobs_are_limited_and_fifo():
    scheduler = Scheduler([], max_cpu_jobs=1)
    for job in ("a", "b", "c"):
        scheduler.enqueue(job, demand_for("cpu", 0, host_gpus=0))
    assert [a.job_id for a in scheduler.next_runnable()] == ["a"]
    assert scheduler.next_runnable() == []
    scheduler.release("a")
    (started,) = scheduler.next_runnable()
    assert started.job_id == "b" and started.gpus == ()
    assert INVENTORY.device_names(started.gpus) == ("CPU:0",)
    assert INVENTORY.cuda_visible_devices(started.gpus) == ""


def test_a_waiting_large_gpu_job_is_not_overtaken_by_younger_gpu_jobs():
    # Past its backfill window (here at once) a waiting job reserves the GPUs.
    scheduler = Scheduler(FOUR_GPUS, backfill_seconds=0)
    scheduler.enqueue("small", mirrored(2))
    scheduler.next_runnable()
    scheduler.enqueue("large", mirrored(4))
    scheduler.enqueue("younger", mirrored(2))
    scheduler.enqueue("cpu", demand_for("cpu", 0, host_gpus=4))
    # Two GPUs are free, but "large" came first; the CPU job still starts.
    assert [a.job_id for a in scheduler.next_runnable()] == ["cpu"]
    scheduler.release("small")
    assert [a.job_id for a in scheduler.next_runnable()] == ["large"]


def test_auto_takes_a_free_gpu_else_the_cpu():
    scheduler = Scheduler([0], auto_gpu_wait_seconds=0)  # no wait for a GPU
    auto = demand_for("auto", 0, host_gpus=1)
    scheduler.enqueue("first", auto)
    scheduler.enqueue("second", auto)
    first, second = scheduler.next_runnable()
    assert (first.strategy, first.gpus) == ("gpu", (0,))
    assert (second.strategy, second.gpus) == ("cpu", ())


def test_cancelled_queued_job_leaves_the_queue():
    scheduler = Scheduler([], max_cpu_jobs=1)
    scheduler.enqueue("a", demand_for("cpu", 0, host_gpus=0))
    scheduler.enqueue("b", demand_for("cpu", 0, host_gpus=0))
    scheduler.next_runnable()
    assert scheduler.remove("b") and not scheduler.remove("b")
    scheduler.release("a")
    assert scheduler.next_runnable() == []


@pytest.mark.parametrize(
    ("strategy", "count", "host_gpus", "expected"),
    [
        ("cpu", 0, 4, Demand(strategy="cpu")),
        ("gpu", 0, 4, Demand(strategy="gpu", gpus=1)),
        ("mirrored", 0, 4, Demand(strategy="mirrored", gpus=4, replicas=4)),
        ("mirrored", 0, 0, Demand(strategy="mirrored", replicas=2)),
        ("mirrored", 3, 0, Demand(strategy="mirrored", replicas=3)),
        ("auto", 0, 0, Demand(strategy="cpu")),
        ("auto", 2, 4, Demand(strategy="mirrored", gpus=2, replicas=2)),
    ],
)
def test_demand_resolution(strategy, count, host_gpus, expected):
    assert demand_for(strategy, count, host_gpus) == expected


@pytest.mark.parametrize(
    ("strategy", "count", "error"),
    [
        ("multi_worker", 0, InvalidArgument),
        ("tpu", 0, InvalidArgument),
        ("cpu", 2, InvalidArgument),
        ("mirrored", -1, InvalidArgument),
        ("gpu", 1, FailedPrecondition),  # no GPU on the host
    ],
)
def test_demand_refusals(strategy, count, error):
    with pytest.raises(error, match="strategy"):
        demand_for(strategy, count, host_gpus=0)


@pytest.mark.slow  # the probe imports TensorFlow in a child process
def test_fake_inventory_and_probe():
    from service.devices import fake_gpus, probe_devices

    gpus = fake_gpus(4)
    assert [gpu.name for gpu in gpus] == ["GPU:0", "GPU:1", "GPU:2", "GPU:3"]
    assert Scheduler([gpu.index for gpu in gpus]).free_gpus == (0, 1, 2, 3)
    # The real probe, forced to run TensorFlow in its child process even here.
    inventory = probe_devices(force=True)
    assert inventory.counts["CPU"] == 1
    assert all(gpu.index >= 0 for gpu in inventory.gpus)
