"""The GPU smoke test's logic, without a GPU: its plan, its checks and its report.

Its plan is checked against the service's own admission over a faked 8-GPU
inventory; its log checks against lines in TensorFlow's and the worker's
formats (and, in the slow test, against a real worker's log on the CPU, which
they must find fault with).
"""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service.api.convert import job_spec_from_proto
from service.cli import gpu_smoke
from service.cli.gpu_smoke import (
    Outcome,
    SmokeJob,
    check_data_devices,
    check_memory,
    check_placement,
    check_strategy,
    gpu_memory,
    plan,
    report,
)
from service.devices import fake_gpus
from service.jobs.validation import validate_job_spec
from service.metrics import ServiceMetrics

ONE = SmokeJob(strategy="gpu", gpus=1, jit=False, precision="float32")
EIGHT = SmokeJob(strategy="mirrored", gpus=8, jit=False, precision="bfloat16")
EIGHT_XLA = SmokeJob(strategy="mirrored", gpus=8, jit=True, precision="bfloat16")


def device(kind: str, index: int) -> str:
    return f"/job:localhost/replica:0/task:0/device:{kind}:{index}"


def placement(op: str, node: str, where: str) -> str:
    return f"while/body/_1/while/{node}: ({op}): {where}"


def test_the_plan_covers_one_gpu_and_every_gpu_with_and_without_xla_and_bfloat16():
    jobs = plan(8)
    assert [(j.strategy, j.gpus, j.jit, j.precision) for j in jobs] == [
        (strategy, gpus, jit, precision)
        for strategy, gpus in (("gpu", 1), ("mirrored", 8))
        for jit in (False, True)
        for precision in ("float32", "bfloat16")
    ]
    assert [j.strategy for j in plan(1)] == ["gpu"] * 4  # one GPU: nothing to mirror


@pytest.mark.parametrize("gpus", [1, 2, 3, 8])
def test_every_planned_job_is_admitted_on_the_gpus_it_names(gpus):
    inventory = fake_gpus(gpus, memory_bytes=80 * 1024**3)
    for job in plan(gpus):
        spec = job_spec_from_proto(job.spec("synthetic", 1))
        assert (spec.train.precision, spec.train.jit_compile) == (job.precision, job.jit)
        demand, _ = validate_job_spec(
            spec, data_dir=None, host_gpus=len(inventory), gpu_memory_bytes=80 * 1024**3
        )
        assert (demand.gpus, demand.replicas) == (job.gpus, job.gpus)
        assert spec.train.batch_size // job.gpus == gpu_smoke.BATCH_PER_GPU


def test_strategy_check_wants_one_gpu_or_nccl_over_every_gpu():
    one = "12:00:00 worker: strategy: OneDeviceStrategy over GPU:0"
    assert check_strategy(one, ONE) == []
    gpus = ", ".join(f"GPU:{i}" for i in range(8))
    mirrored = f"12:00:00 worker: strategy: MirroredStrategy over {gpus}; all-reduce "
    nccl_started = "\nhost:1:2 [0] NCCL INFO Bootstrap : Using eth0\n"
    assert check_strategy(mirrored + "CollectiveAllReduce (NCCL)" + nccl_started, EIGHT) == []
    problems = check_strategy(mirrored + "ReductionToOneDevice", EIGHT)
    assert problems == [
        "the all-reduce is not NCCL: MirroredStrategy over "
        f"{gpus}; all-reduce ReductionToOneDevice",
        "NCCL logged nothing (NCCL_DEBUG=INFO): it never started",
    ]
    assert check_strategy("", ONE) == ["the worker logged no strategy"]


def test_data_check_wants_every_replica_copy_on_its_own_gpu():
    def log(devices):
        where = {name: devices for name in ("images", "labels", "order")}
        return f"12:00:00 worker: data on: {json.dumps(where)}; precision float32"

    assert check_data_devices(log([device("GPU", i) for i in range(8)]), EIGHT) == []
    assert check_data_devices(log([device("GPU", 0)] * 8), EIGHT)[0] == ("images on 1 GPUs, not 8")
    assert check_data_devices(log([device("CPU", 0)]), ONE)[0].startswith("images not on a GPU")


def test_placement_check_reads_tensorflows_placer_lines():
    gathers = [placement("ResourceGather", f"Gather_{i}", device("GPU", i)) for i in range(8)]
    step = [placement(op, op, device("GPU", 0)) for op in gpu_smoke.STEP_OPS]
    assert check_placement("\n".join(gathers + step), EIGHT) == []
    # With XLA the loss and accuracy ops are inside the cluster: only the gathers show.
    assert check_placement("\n".join(gathers), EIGHT_XLA) == []
    assert check_placement("\n".join(gathers), EIGHT) == [
        f"no {op} in the placement log" for op in gpu_smoke.STEP_OPS
    ]
    on_host = gathers + [placement("Equal", "Equal", device("CPU", 0))] + step
    assert check_placement("\n".join(on_host), EIGHT) == [
        "Equal placed off the GPUs: while/body/_1/while/Equal and 0 more"
    ]
    assert check_placement("\n".join(gathers[:2]), EIGHT_XLA) == ["ResourceGather on 2 GPUs, not 8"]


def test_memory_check_reads_the_servers_metrics():
    metrics = ServiceMetrics(CollectorRegistry())
    metrics.job_gpu_memory("job-s", "mirrored", "GPU:0", 300, 900)
    metrics.job_gpu_memory("job-s", "mirrored", "GPU:1", 0, 0)
    metrics.job_gpu_memory("job-other", "mirrored", "GPU:2", 5, 5)
    memory = gpu_memory(generate_latest(metrics.registry).decode(), "job-s")
    assert memory == {"in_use": {"GPU:0": 300, "GPU:1": 0}, "peak": {"GPU:0": 900, "GPU:1": 0}}
    assert check_memory(memory, ["GPU:0"]) == []
    assert check_memory(memory, ["GPU:0", "GPU:1", "GPU:2"]) == [
        "GPU memory in_use for GPU:1 is 0.0",
        "GPU memory in_use for GPU:2 is absent",
        "GPU memory peak for GPU:1 is 0.0",
        "GPU memory peak for GPU:2 is absent",
    ]


def test_the_report_prints_throughput_bfloat16s_speed_up_and_every_failure():
    outcomes = [
        Outcome(ONE, "job-a", ("GPU:0",), 40_000.0, 0.97, 2 * 1024**3),
        Outcome(
            SmokeJob(strategy="gpu", gpus=1, jit=False, precision="bfloat16"),
            "job-b",
            ("GPU:0",),
            72_000.0,
            0.969,
            1024**3,
            ["NCCL logged nothing"],
        ),
    ]
    text = report(outcomes)
    assert "1 GPU, no XLA, float32" in text and "40,000" in text and "97.00%" in text
    assert "bfloat16 / float32, 1 GPU, no XLA: 1.80x" in text
    assert text.splitlines()[-1] == ("FAILED 1 GPU, no XLA, bfloat16 (job-b): NCCL logged nothing")


def test_plan_only_needs_no_server(capsys):
    assert gpu_smoke.main(["--plan", "--gpus", "4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "1 GPU, no XLA, float32: batch 128"
    assert printed[-1] == "mirrored x4, XLA, bfloat16: batch 512"


@pytest.mark.slow  # a server and a training worker
def test_the_checks_find_fault_with_a_real_worker_on_the_cpu(tmp_path, monkeypatch):
    """A real worker's log, in TensorFlow's own format: the checks read it and see the CPU."""
    from ntrain.v1 import training_pb2 as pb
    from service_harness import RunningServer, job_spec

    monkeypatch.setenv("NTRAIN_LOG_DEVICE_PLACEMENT", "1")
    server = RunningServer(tmp_path, warm_worker=False)
    try:
        job = server.wait_for(server.submit(job_spec()).job_id)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.failure_reason
        log = (server.manager.store.job_dir(job.job_id) / "train.log").read_text()
    finally:
        server.stop()
    cpu = device("CPU", 0)
    assert check_strategy(log, ONE) == ["strategy is not one GPU: OneDeviceStrategy over CPU:0"]
    assert check_data_devices(log, ONE) == [
        f"{name} not on a GPU: {cpu}" for name in ("images", "labels", "order")
    ]
    placement_problems = check_placement(log, ONE)
    assert [p.split(":")[0] for p in placement_problems] == [
        f"{op} placed off the GPUs" for op in (*gpu_smoke.GATHER_OPS, *gpu_smoke.STEP_OPS)
    ]
