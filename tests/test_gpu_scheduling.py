"""Scheduling a real GPU host, over a faked 8-GPU inventory and a clock moved by hand.

Default mirrored sizes, backfill with bounded waiting, `auto` waiting for a
GPU, packing small jobs onto shared GPUs, and device identity (tokens of the
server's CUDA_VISIBLE_DEVICES passed on unchanged, names in the host's numbering).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from naive_model.config import TrainConfig
from service.devices import (
    DeviceInventory,
    GpuDevice,
    child_cuda_env,
    fake_gpus,
    identify_gpus,
    parse_nvidia_smi,
)
from service.jobs.errors import FailedPrecondition
from service.jobs.scheduler import (
    AUTO_GPU_WAIT_SECONDS,
    BACKFILL_SECONDS,
    CUDA_CONTEXT_BYTES,
    Demand,
    Scheduler,
    default_gpu_count,
    demand_for,
)
from service.jobs.validation import validate_job_spec
from service.protocol import JobSpec

EIGHT = DeviceInventory(gpus=fake_gpus(8, memory_bytes=16 * 1024**3))
GiB = 1024**3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def scheduler(clock, **options) -> Scheduler:
    return Scheduler([gpu.index for gpu in EIGHT.gpus], clock=clock, **options)


def mirrored(gpus: int) -> Demand:
    return demand_for("mirrored", gpus, host_gpus=8)


def one_gpu(memory_bytes: int = GiB) -> Demand:
    return dataclasses.replace(demand_for("gpu", 0, host_gpus=8), memory_bytes=memory_bytes)


def started(scheduler: Scheduler) -> list[str]:
    return [assignment.job_id for assignment in scheduler.next_runnable()]


# -- mirrored without a count --------------------------------------------------------


@pytest.mark.parametrize(
    ("batch_size", "host_gpus", "expected"),
    [
        (128, 8, 2),  # 64 examples each; 8 GPUs would leave 16
        (256, 8, 4),
        (384, 8, 6),  # 6 divides 384 with 64 each; 7 and 8 do not fit
        (512, 8, 8),
        (4096, 8, 8),  # never more than the host has
        (192, 8, 3),
        (96, 8, 1),  # 2 GPUs would leave 48 each
        (100, 8, 1),
        (128, 3, 2),  # 3 does not divide 128
        (768, 7, 6),  # 7 does not divide 768
        (128, 1, 1),
    ],
)
def test_mirrored_without_a_count_takes_the_most_gpus_the_batch_allows(
    batch_size, host_gpus, expected
):
    assert default_gpu_count(batch_size, host_gpus) == expected
    demand = demand_for("mirrored", 0, host_gpus, batch_size=batch_size)
    assert (demand.gpus, demand.replicas) == (expected, expected)
    assert batch_size % demand.replicas == 0


def test_admission_sizes_a_mirrored_job_by_its_batch_and_counts_the_data(tmp_path):
    spec = JobSpec(train=TrainConfig(batch_size=512), dataset="synthetic", strategy="mirrored")
    demand, info = validate_job_spec(spec, data_dir=None, host_gpus=8, gpu_memory_bytes=16 * GiB)
    assert (demand.gpus, demand.replicas) == (8, 8)
    model = spec.train.model_bytes(info.input_size)
    activations = 4 * 2 * 512 * (512 + 10) // 8
    assert demand.memory_bytes == model + activations + info.device_bytes
    assert info.device_bytes == info.num_train * (info.input_size * 4 + 16)  # float32 features


def test_admission_refuses_a_data_set_that_fills_every_gpu(tmp_path):
    # 2,000 uint8 images of 64x64x3 (12,288 features): 25 MB on each GPU.
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "big.npz",
        x_train=rng.integers(0, 256, (2_000, 64, 64, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, 2_000),
        x_test=rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 10),
    )
    spec = JobSpec(train=TrainConfig(), dataset="big.npz", strategy="gpu")
    demand, info = validate_job_spec(spec, data_dir=tmp_path, host_gpus=8, gpu_memory_bytes=GiB)
    assert info.feature_bytes == 1 and info.device_bytes == 2_000 * (12_288 + 16)
    # The model and its activations alone would fit in 80 MiB; with the data they do not.
    limit = 80 * 1024**2
    assert demand.memory_bytes - info.device_bytes < limit < demand.memory_bytes
    # Refused as every job too big for a GPU is (service.jobs.validation._check_memory).
    with pytest.raises(FailedPrecondition, match="per GPU, more than"):
        validate_job_spec(spec, data_dir=tmp_path, host_gpus=8, gpu_memory_bytes=limit)


# -- backfill and bounded waiting ----------------------------------------------------


def test_younger_jobs_that_fit_backfill_while_a_large_one_waits(clock):
    gpus = scheduler(clock)
    gpus.enqueue("six", mirrored(6))
    assert started(gpus) == ["six"]
    gpus.enqueue("four", mirrored(4))  # 2 GPUs free: it waits
    gpus.enqueue("one", one_gpu())
    gpus.enqueue("two", mirrored(2))
    # "one" fits and starts; then only 1 GPU is free, so "two" waits too.
    assert started(gpus) == ["one"]
    assert gpus.free_gpus == (7,)
    gpus.release("six")
    assert started(gpus) == ["four", "two"]  # oldest first once they fit


def test_past_its_window_a_waiting_job_reserves_gpus_and_starts_next(clock):
    gpus = scheduler(clock, backfill_seconds=BACKFILL_SECONDS)
    gpus.enqueue("six", mirrored(6))
    started(gpus)
    gpus.enqueue("eight", mirrored(8))
    clock.now += BACKFILL_SECONDS - 1
    gpus.enqueue("early", one_gpu())
    assert started(gpus) == ["early"]  # still inside the window: backfill
    clock.now += 1
    gpus.enqueue("late", one_gpu())
    gpus.enqueue("cpu", demand_for("cpu", 0, host_gpus=8))
    assert started(gpus) == ["cpu"]  # "eight" holds the GPUs now; the CPU is no GPU
    gpus.release("six")
    assert started(gpus) == []  # 7 free of 8: the reservation keeps them
    gpus.release("early")
    assert started(gpus) == ["eight"]
    gpus.release("eight")
    assert started(gpus) == ["late"]


def test_a_stream_of_small_jobs_does_not_starve_a_large_one(clock):
    """Small jobs arrive every minute and each runs five; the 8-GPU job starts in bounded time."""
    gpus = scheduler(clock, backfill_seconds=BACKFILL_SECONDS)
    ends: dict[str, float] = {}
    gpus.enqueue("large", mirrored(8))
    waited = None
    for minute in range(60):
        clock.now = 1000.0 + 60 * minute
        for job, end in list(ends.items()):
            if end <= clock.now:
                gpus.release(job)
                del ends[job]
        gpus.enqueue(f"small-{minute}", one_gpu())
        for job in started(gpus):
            if job == "large":
                waited = clock.now - 1000.0
            else:
                ends[job] = clock.now + 300
        if waited is not None:
            break
    assert waited is not None, "the 8-GPU job never started"
    # At most the window, plus the longest small run that started before it ended.
    assert waited <= BACKFILL_SECONDS + 300 + 60


# -- auto ------------------------------------------------------------------------------


def test_auto_waits_a_bounded_time_for_a_gpu_before_the_cpu(clock):
    gpus = Scheduler([0], clock=clock)
    gpus.enqueue("busy", demand_for("gpu", 0, host_gpus=1))
    started(gpus)
    gpus.enqueue("auto", demand_for("auto", 0, host_gpus=1))
    assert started(gpus) == [] and gpus.next_wakeup() == 1000.0 + AUTO_GPU_WAIT_SECONDS
    clock.now += AUTO_GPU_WAIT_SECONDS - 1
    assert started(gpus) == []
    clock.now += 1
    (on_cpu,) = gpus.next_runnable()
    assert (on_cpu.strategy, on_cpu.gpus) == ("cpu", ())
    assert gpus.next_wakeup() is None


def test_auto_takes_a_gpu_that_frees_while_it_waits(clock):
    gpus = Scheduler([0], clock=clock)
    gpus.enqueue("busy", demand_for("gpu", 0, host_gpus=1))
    started(gpus)
    gpus.enqueue("auto", demand_for("auto", 0, host_gpus=1))
    assert started(gpus) == []
    clock.now += 10
    gpus.release("busy")
    (on_gpu,) = gpus.next_runnable()
    assert (on_gpu.strategy, on_gpu.gpus) == ("gpu", (0,))


def test_a_wait_that_ended_needs_no_more_wakeups(clock):
    gpus = Scheduler([0], clock=clock, max_cpu_jobs=1)
    gpus.enqueue("busy-gpu", demand_for("gpu", 0, host_gpus=1))
    gpus.enqueue("busy-cpu", demand_for("cpu", 0, host_gpus=1))
    gpus.enqueue("auto", demand_for("auto", 0, host_gpus=1))
    assert started(gpus) == ["busy-gpu", "busy-cpu"]
    clock.now += AUTO_GPU_WAIT_SECONDS + 1
    assert started(gpus) == [] and gpus.next_wakeup() is None  # it waits for a release now


# -- packing ---------------------------------------------------------------------------


def test_small_one_gpu_jobs_share_gpus_under_a_memory_limit(clock):
    gpus = scheduler(clock, jobs_per_gpu=4, gpu_memory_bytes=16 * GiB)
    share = (16 * GiB - 4 * CUDA_CONTEXT_BYTES) // 4
    assert gpus.share_bytes == share == int(3.5 * GiB)
    for job in range(5):
        gpus.enqueue(f"small-{job}", one_gpu(GiB))
    placed = gpus.next_runnable()
    assert [a.gpus for a in placed] == [(0,)] * 4 + [(1,)]  # the fullest GPU first
    assert all(a.memory_limit_bytes == share for a in placed)
    assert gpus.free_gpus == (2, 3, 4, 5, 6, 7)
    # Too large for a share, or mirrored: whole GPUs, no limit.
    gpus.enqueue("large", one_gpu(4 * GiB))
    gpus.enqueue("seven", mirrored(7))
    (large,) = gpus.next_runnable()
    assert (large.gpus, large.memory_limit_bytes) == ((2,), 0)
    for job in range(4):
        gpus.release(f"small-{job}")
    assert gpus.free_gpus == (0, 3, 4, 5, 6, 7)
    gpus.release("small-4")
    (seven,) = gpus.next_runnable()
    assert seven.gpus == (0, 1, 3, 4, 5, 6, 7) and seven.memory_limit_bytes == 0


def test_auto_jobs_are_packed_too_and_unknown_sizes_are_not(clock):
    gpus = Scheduler([0, 1], clock=clock, jobs_per_gpu=2, gpu_memory_bytes=16 * GiB)
    auto = dataclasses.replace(demand_for("auto", 0, host_gpus=2), memory_bytes=GiB)
    gpus.enqueue("auto-a", auto)
    gpus.enqueue("auto-b", auto)
    gpus.enqueue("unknown", demand_for("gpu", 0, host_gpus=2))  # memory_bytes 0
    a, b, unknown = gpus.next_runnable()
    assert a.gpus == b.gpus == (0,) and a.memory_limit_bytes > 0
    assert unknown.gpus == (1,) and unknown.memory_limit_bytes == 0


def test_packing_needs_the_gpus_memory():
    with pytest.raises(ValueError, match="jobs_per_gpu 2 needs the GPUs' memory"):
        Scheduler([0, 1], jobs_per_gpu=2, gpu_memory_bytes=0)
    Scheduler([], jobs_per_gpu=2)  # no GPUs: nothing to pack, nothing to refuse


# -- device identity -----------------------------------------------------------------

SMI_LIST = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaaaaaa-0000-0000-0000-000000000000)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-bbbbbbbb-1111-1111-1111-111111111111)
  MIG 3g.20gb     Device  0: (UUID: MIG-cccccccc-2222-2222-2222-222222222222)
  MIG 1g.5gb      Device  1: (UUID: MIG-dddddddd-3333-3333-3333-333333333333)
GPU 2: NVIDIA L4 (UUID: GPU-eeeeeeee-4444-4444-4444-444444444444)
"""
SMI_MEMORY = "0, 81559\n1, 40960\n2, 23034\n"


def test_nvidia_smi_devices_are_found_by_every_token_cuda_takes():
    smi = parse_nvidia_smi(SMI_LIST, SMI_MEMORY)
    assert smi["2"].name == "GPU:2" and smi["2"].memory_bytes == 23034 * 1024**2
    assert smi["GPU-bbbbbbbb-1111-1111-1111-111111111111"].name == "GPU:1"
    mig = smi["MIG-dddddddd-3333-3333-3333-333333333333"]
    assert (mig.name, mig.memory_bytes) == ("GPU:1/MIG:1", 5 * 1000**3)


@pytest.mark.parametrize(
    ("visible", "count", "tokens", "names"),
    [
        (None, 3, ["0", "1", "2"], ["GPU:0", "GPU:1", "GPU:2"]),  # every GPU, PCI order
        ("2,0", 2, ["2", "0"], ["GPU:2", "GPU:0"]),
        (
            "GPU-eeeeeeee,GPU-aaaaaaaa-0000-0000-0000-000000000000",  # a prefix, a whole UUID
            2,
            ["GPU-eeeeeeee", "GPU-aaaaaaaa-0000-0000-0000-000000000000"],
            ["GPU:2", "GPU:0"],
        ),
        (
            "MIG-cccccccc-2222-2222-2222-222222222222",
            1,
            ["MIG-cccccccc-2222-2222-2222-222222222222"],
            ["GPU:1/MIG:0"],
        ),
    ],
)
def test_tokens_of_the_servers_restriction_pass_through_unchanged(visible, count, tokens, names):
    gpus = identify_gpus(visible, count, parse_nvidia_smi(SMI_LIST, SMI_MEMORY))
    assert [gpu.index for gpu in gpus] == list(range(count))  # what the scheduler hands out
    inventory = DeviceInventory(gpus=tuple(gpus))
    everything = [gpu.index for gpu in gpus]
    assert inventory.cuda_visible_devices(everything) == ",".join(tokens)
    assert list(inventory.device_names(everything)) == names


def test_without_nvidia_smi_tokens_still_pass_and_name_themselves():
    gpus = identify_gpus("GPU-1234,3", 2, {})
    assert [gpu.visible_id for gpu in gpus] == ["GPU-1234", "3"]
    assert [gpu.name for gpu in gpus] == ["GPU-1234", "GPU:3"]
    # Never a position in place of a token: that would reach outside the server's GPUs.
    assert DeviceInventory(gpus=tuple(gpus)).cuda_visible_devices([1]) == "3"


def test_an_assignment_names_the_hosts_gpus_and_gives_their_tokens():
    inventory = DeviceInventory(
        gpus=(
            GpuDevice(index=0, cuda_id="GPU-aaaa", host_name="GPU:4"),
            GpuDevice(index=1, cuda_id="GPU-bbbb", host_name="GPU:6"),
        )
    )
    gpus = Scheduler([0, 1])
    gpus.enqueue("job", demand_for("gpu", 0, host_gpus=2))
    gpus.enqueue("other", demand_for("gpu", 0, host_gpus=2))
    first, second = gpus.next_runnable()
    assert inventory.device_names(second.gpus) == ("GPU:6",)
    assert inventory.cuda_visible_devices(second.gpus) == "GPU-bbbb"
    assert inventory.device_names(first.gpus) == ("GPU:4",)


def test_children_count_gpus_in_pci_bus_order_unless_told_otherwise():
    assert child_cuda_env({}) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert child_cuda_env({"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}) == {
        "CUDA_DEVICE_ORDER": "FASTEST_FIRST"
    }


@pytest.mark.slow  # a server and a worker process
def test_a_worker_is_given_the_servers_tokens_and_the_job_the_hosts_names(tmp_path):
    from ntrain.v1 import training_pb2 as pb
    from service_harness import RunningServer, job_spec

    inventory = (
        GpuDevice(index=0, memory_bytes=16 * GiB, cuda_id="GPU-aaaa", host_name="GPU:4"),
        GpuDevice(index=1, memory_bytes=16 * GiB, cuda_id="MIG-bbbb", host_name="GPU:6/MIG:0"),
    )
    server = RunningServer(tmp_path, warm_worker=False, gpu_inventory=inventory)
    try:
        first = server.submit(job_spec(strategy=pb.StrategySpec(name="gpu")))
        second = server.submit(job_spec(strategy=pb.StrategySpec(name="gpu")))
        # No GPU answers to those tokens here, so the jobs fail in their workers.
        first, second = (server.wait_for(job.job_id) for job in (first, second))
        assert list(first.devices) == ["GPU:4"] and list(second.devices) == ["GPU:6/MIG:0"]
        starting = [t.reason for t in second.transitions if t.state == pb.JOB_STATE_STARTING]
        assert starting == ["on GPU:6/MIG:0"]
        log = (server.manager.store.job_dir(second.job_id) / "train.log").read_text()
        order = child_cuda_env()["CUDA_DEVICE_ORDER"]  # PCI_BUS_ID unless this env names one
        assert f"CUDA_VISIBLE_DEVICES='MIG-bbbb' CUDA_DEVICE_ORDER={order}" in log
        assert "host GPUs GPU:6/MIG:0" in log
    finally:
        server.stop()
