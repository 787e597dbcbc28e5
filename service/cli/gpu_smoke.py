"""The GPU smoke test: run once on a real GPU host (`deploy/gpu-smoke.sh`, `make gpu-smoke`).

Starts `ntrain serve` on free local ports with a temporary state directory,
its workers logging where TensorFlow places every op
(NTRAIN_LOG_DEVICE_PLACEMENT=1) and NCCL logging its set-up (NCCL_DEBUG=INFO).
Then it trains, one job at a time so each has the GPUs to itself:

  one GPU (strategy gpu) and every GPU (mirrored, when there are several),
  each with and without XLA, each in float32 and bfloat16,
  at 128 examples per GPU, one epoch of MNIST (or --dataset).

and checks each job: it SUCCEEDED on the GPUs it asked for; the worker built
the strategy it should (one GPU; or MirroredStrategy all-reducing with
CollectiveAllReduce over NCCL, and NCCL's own log shows it started); the
training data (images, labels, order) sits on the GPUs, one copy per replica;
the placement log puts the per-step gathers (and, without XLA, the loss,
ArgMax and Equal) on GPUs; and the server's GPU memory metrics (in use and
epoch peak) are above zero for every GPU of the job. It prints a table with
each job's throughput and test accuracy, then every failed check, and exits 0
only when none failed. `--plan` prints the jobs it would run and stops.

    python -m service.cli.gpu_smoke [--dataset mnist] [--epochs 1] [--data-dir DIR]
                                    [--state-dir DIR] [--plan [--gpus N]]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ntrain.v1 import training_pb2, training_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ntrain.client import QUICK_TIMEOUT
from ntrain.client.channel import open_channel
from ntrain.client.states import state_name
from service.cli.local_server import LocalServer
from service.cli.specs import book_job_spec

BATCH_PER_GPU = 128
JOB_TIMEOUT_SECONDS = 1800.0
PRECISIONS = ("float32", "bfloat16")
# What the placement log must show on a GPU: the per-step gathers of the data,
# and (without XLA, whose cluster hides its ops) the loss and the accuracy's ops.
GATHER_OPS = ("ResourceGather",)
STEP_OPS = ("SparseSoftmaxCrossEntropyWithLogits", "ArgMax", "Equal")
# TensorFlow's placer prints one line per node: "name: (OpType): /job:.../device:GPU:0".
_PLACEMENT = re.compile(r"^(?P<node>\S+): \((?P<op>\w+)\): (?P<device>/job:\S+)$")
_STRATEGY = re.compile(r"worker: strategy: (?P<text>.*)$", re.MULTILINE)
_DATA_ON = re.compile(r"worker: data on: (?P<json>\{.*\})", re.MULTILINE)


@dataclass(frozen=True, kw_only=True)
class SmokeJob:
    """One job of the smoke test."""

    strategy: str  # "gpu" or "mirrored"
    gpus: int
    jit: bool
    precision: str

    @property
    def batch_size(self) -> int:
        return BATCH_PER_GPU * self.gpus

    @property
    def label(self) -> str:
        where = "1 GPU" if self.strategy == "gpu" else f"mirrored x{self.gpus}"
        return f"{where}, {'XLA' if self.jit else 'no XLA'}, {self.precision}"

    def spec(self, dataset: str, epochs: int) -> training_pb2.JobSpec:
        return book_job_spec(
            training_pb2.JobSpec(
                dataset=dataset,
                epochs=epochs,
                batch_size=self.batch_size,
                strategy=training_pb2.StrategySpec(name=self.strategy, device_count=self.gpus),
                jit_compile=self.jit,
                precision=self.precision,
            )
        )


def plan(gpu_count: int) -> list[SmokeJob]:
    """The jobs for a host with `gpu_count` GPUs: one GPU, and all of them when several."""
    shapes = [("gpu", 1)] + ([("mirrored", gpu_count)] if gpu_count > 1 else [])
    return [
        SmokeJob(strategy=strategy, gpus=gpus, jit=jit, precision=precision)
        for strategy, gpus in shapes
        for jit in (False, True)
        for precision in PRECISIONS
    ]


def check_strategy(log: str, job: SmokeJob) -> list[str]:
    """Problems with the strategy the worker logged building (and, over GPUs, NCCL's start)."""
    found = _STRATEGY.search(log)
    if found is None:
        return ["the worker logged no strategy"]
    text = found["text"]
    if job.strategy == "gpu":
        if not text.startswith("OneDeviceStrategy over GPU:"):
            return [f"strategy is not one GPU: {text}"]
        return []
    problems = []
    if not text.startswith("MirroredStrategy over GPU:") or text.count("GPU:") != job.gpus:
        problems.append(f"strategy is not mirrored over {job.gpus} GPUs: {text}")
    if "all-reduce CollectiveAllReduce (NCCL)" not in text:
        problems.append(f"the all-reduce is not NCCL: {text}")
    if "NCCL INFO" not in log:
        problems.append("NCCL logged nothing (NCCL_DEBUG=INFO): it never started")
    return problems


def check_data_devices(log: str, job: SmokeJob) -> list[str]:
    """Problems with where the worker said the training data lives."""
    found = _DATA_ON.search(log)
    if found is None:
        return ["the worker logged no data devices"]
    problems = []
    for name, devices in json.loads(found["json"]).items():
        off = [device for device in devices if "/device:GPU:" not in device]
        if off:
            problems.append(f"{name} not on a GPU: {', '.join(off)}")
        elif len(set(devices)) != job.gpus:
            problems.append(f"{name} on {len(set(devices))} GPUs, not {job.gpus}")
    return problems


def check_placement(log: str, job: SmokeJob) -> list[str]:
    """Problems with where TensorFlow placed the step's data ops (the placer's log lines)."""
    placed = [
        (match["node"], match["op"], match["device"])
        for line in log.splitlines()
        if (match := _PLACEMENT.match(line.strip()))
    ]
    problems = []
    for op in GATHER_OPS + (() if job.jit else STEP_OPS):
        seen = [(node, device) for node, kind, device in placed if kind == op]
        off = [node for node, device in seen if "/device:GPU:" not in device]
        gpus = {device for _, device in seen if "/device:GPU:" in device}
        if not seen:
            problems.append(f"no {op} in the placement log")
        elif off:
            problems.append(f"{op} placed off the GPUs: {off[0]} and {len(off) - 1} more")
        elif op in GATHER_OPS and len(gpus) < job.gpus:
            problems.append(f"{op} on {len(gpus)} GPUs, not {job.gpus}")
    return problems


def gpu_memory(metrics_text: str, job_id: str) -> dict[str, dict[str, float]]:
    """The job's GPU memory series: {"in_use": {device: bytes}, "peak": {device: bytes}}."""
    names = {"ntrain_gpu_memory_in_use_bytes": "in_use", "ntrain_gpu_memory_peak_bytes": "peak"}
    found: dict[str, dict[str, float]] = {"in_use": {}, "peak": {}}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in names and sample.labels.get("job_id") == job_id:
                found[names[sample.name]][sample.labels["device"]] = sample.value
    return found


def check_memory(memory: dict[str, dict[str, float]], devices: Sequence[str]) -> list[str]:
    """Problems with the job's memory metrics: each of its GPUs must read above zero."""
    problems = []
    for kind, values in memory.items():
        for device in devices:
            if not values.get(device, 0) > 0:
                problems.append(f"GPU memory {kind} for {device} is {values.get(device, 'absent')}")
    return problems


@dataclass
class Outcome:
    job: SmokeJob
    job_id: str = ""
    devices: tuple[str, ...] = ()
    examples_per_second: float = 0.0
    test_accuracy: float = 0.0
    peak_bytes: float = 0.0
    problems: list[str] = field(default_factory=list)


def run_job(
    stub: training_pb2_grpc.TrainingServiceStub,
    job: SmokeJob,
    *,
    dataset: str,
    epochs: int,
    state_dir: Path,
    metrics_url: str,
) -> Outcome:
    outcome = Outcome(job)
    submitted = stub.SubmitJob(
        training_pb2.SubmitJobRequest(spec=job.spec(dataset, epochs), request_id=uuid.uuid4().hex),
        timeout=QUICK_TIMEOUT,
    )
    outcome.job_id = submitted.job_id
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    ended = submitted
    while ended.state not in (
        training_pb2.JOB_STATE_SUCCEEDED,
        training_pb2.JOB_STATE_FAILED,
        training_pb2.JOB_STATE_CANCELED,
    ):
        if time.monotonic() > deadline:
            stub.CancelJob(training_pb2.CancelJobRequest(job_id=submitted.job_id), timeout=60)
            outcome.problems.append(f"did not end within {JOB_TIMEOUT_SECONDS:.0f} s")
            return outcome
        time.sleep(1.0)
        request = training_pb2.GetJobRequest(job_id=submitted.job_id)
        ended = stub.GetJob(request, timeout=QUICK_TIMEOUT)
    outcome.devices = tuple(ended.devices)
    if ended.state != training_pb2.JOB_STATE_SUCCEEDED:
        state = state_name(ended.state)
        outcome.problems.append(f"ended {state}: {ended.failure_reason}")
        return outcome
    outcome.examples_per_second = ended.result.examples_per_second
    outcome.test_accuracy = ended.result.test_accuracy
    if len(outcome.devices) != job.gpus or not all(d.startswith("GPU") for d in outcome.devices):
        outcome.problems.append(f"ran on {', '.join(outcome.devices)}, not {job.gpus} GPU(s)")
    log_path = state_dir / "jobs" / submitted.job_id / "train.log"
    log = log_path.read_text(errors="replace") if log_path.is_file() else ""
    for check in (check_strategy, check_data_devices, check_placement):
        outcome.problems += check(log, job)
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        memory = gpu_memory(response.read().decode(), submitted.job_id)
    outcome.problems += check_memory(memory, outcome.devices)
    outcome.peak_bytes = max(memory["peak"].values(), default=0.0)
    return outcome


def report(outcomes: Sequence[Outcome]) -> str:
    """The table of jobs, bfloat16's speed-up, then every failed check."""
    lines = [f"{'job':34} {'examples/s':>11} {'accuracy':>9} {'peak GiB':>9}  checks"]
    for o in outcomes:
        lines.append(
            f"{o.job.label:34} {o.examples_per_second:11,.0f} {o.test_accuracy:9.2%} "
            f"{o.peak_bytes / 1024**3:9.2f}  {'ok' if not o.problems else 'FAILED'}"
        )
    rates = {(o.job.strategy, o.job.jit, o.job.precision): o.examples_per_second for o in outcomes}
    for (strategy, jit, precision), rate in rates.items():
        base = rates.get((strategy, jit, "float32"), 0.0)
        if precision == "bfloat16" and base and rate:
            where = "1 GPU" if strategy == "gpu" else "mirrored"
            lines.append(
                f"bfloat16 / float32, {where}, {'XLA' if jit else 'no XLA'}: {rate / base:.2f}x"
            )
    for o in outcomes:
        lines += [f"FAILED {o.job.label} ({o.job_id or 'not submitted'}): {p}" for p in o.problems]
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.state_dir:
        state_dir = Path(args.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
    else:
        state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ntrain-smoke-")))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", NTRAIN_LOG_DEVICE_PLACEMENT="1")
    env.setdefault("NCCL_DEBUG", "INFO")
    metrics_port = _free_port()
    data_dir = Path(args.data_dir) if args.data_dir else None
    print(f"starting ntrain serve (state in {state_dir}) ...", flush=True)
    data_args = [] if data_dir is None else ["--data-dir", str(data_dir)]
    server = LocalServer(state_dir, [*data_args, "--metrics-port", str(metrics_port)], env=env)
    stack.callback(server.stop)
    channel = stack.enter_context(open_channel(server.address))
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    info = stub.GetServerInfo(training_pb2.GetServerInfoRequest(), timeout=QUICK_TIMEOUT)
    gpus = [device for device in info.devices if device.kind == "GPU"]
    if not gpus:
        print("FAILED: the server sees no GPU; this test is for a GPU host", file=sys.stderr)
        return 1
    names = ", ".join(f"{gpu.name} ({gpu.description})" for gpu in gpus)
    print(f"TensorFlow {info.tensorflow_version}; GPUs: {names}", flush=True)
    outcomes = []
    for job in plan(len(gpus)):
        print(f"  {job.label} ...", flush=True)
        outcomes.append(
            run_job(
                stub,
                job,
                dataset=args.dataset,
                epochs=args.epochs,
                state_dir=state_dir,
                metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            )
        )
    print(report(outcomes), flush=True)
    return 0 if not any(o.problems for o in outcomes) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.cli.gpu_smoke",
        description="Check ntrain on a real GPU host: one GPU and all GPUs, XLA, bfloat16.",
    )
    parser.add_argument("--dataset", default="mnist", help="mnist (default) or synthetic")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-dir", default=None, help="the server's --data-dir")
    parser.add_argument("--state-dir", default=None, help="keep the server's state (and logs)")
    parser.add_argument("--plan", action="store_true", help="print the jobs and stop")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs to plan for with --plan")
    args = parser.parse_args(argv)
    if args.plan:
        for job in plan(args.gpus):
            print(f"{job.label}: batch {job.batch_size}")
        return 0
    with ExitStack() as stack:
        return run(args, stack)


if __name__ == "__main__":
    sys.exit(main())
