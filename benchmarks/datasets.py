"""Pushed data sets: streaming's speed and memory, upload throughput, conversion time.

    python -m benchmarks.datasets --json FILE [--only NAME]... [--rounds N]

throughput   samples/s on MNIST at batch 128, streamed (windows of 64 batches
             from the canonical files) against held in device variables: the
             two trainers' epochs interleaved, round after round, in one process
rss          a worker's peak resident memory (VmHWM) training one epoch of MNIST
             tiled 1x, 4x and 16x with data_mode auto under a 64 MiB budget
             (the worker chooses to stream: the log line says so), and held
             whole (1x, 4x) for comparison: the worker's own train task, each in
             a fresh interpreter
upload       1 GiB pushed over loopback to a server in its own process: the
             transfer alone (a header with a wrong digest, so the server reads
             and hashes every byte, then refuses without converting), and the
             server's resident memory growth, sampled during it
conversion   seconds per GB to check and convert CSV and Parquet files (MNIST
             rows, 784 columns and a label), in the conversion worker

Every section records the load average it ran under: other tenants of the
machine slow some runs, and the paired throughput ratio is the figure least
moved by them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.report import SHARED_MNIST, machine, paired_ratio, publish, side_by_side
from naive_model.canonical import Manifest, NpyWriter, write_manifest
from naive_model.config import LayerSpec, TrainConfig

MIB = 2**20
SECTIONS = ("throughput", "rss", "upload", "conversion")
BUDGET = 64 * MIB
TILES = (1, 4, 16)
HELD_TILES = (1, 4)  # 16x held whole would take some 3 GiB: the trend is plain by 4x


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def mnist_folder(root: Path, tiles: int = 1) -> Path:
    """MNIST in the canonical layout, its training split repeated `tiles` times."""
    folder = root / f"mnist-x{tiles}"
    if (folder / "manifest.json").exists():
        return folder
    folder.mkdir(parents=True)
    with np.load(SHARED_MNIST) as mnist:
        x_train = mnist["x_train"].reshape(60000, 784)
        y_train = mnist["y_train"].astype(np.int64)
        splits = {"train": (x_train, y_train), "test": (mnist["x_test"], mnist["y_test"])}
    for split, (x, y) in splits.items():
        repeats = tiles if split == "train" else 1
        images = NpyWriter(folder / f"x_{split}.npy", np.dtype(np.uint8), (784,))
        labels = NpyWriter(folder / f"y_{split}.npy", np.dtype(np.int64), ())
        for _ in range(repeats):
            images.append(x.reshape(len(x), 784))
            labels.append(y)
        images.close()
        labels.close()
    manifest = Manifest(
        input_size=784,
        num_classes=10,
        num_train=60000 * tiles,
        num_test=10000,
        feature_dtype="uint8",
        source_format="npz",
    )
    write_manifest(folder, manifest)
    return folder


# -- throughput ------------------------------------------------------------------------


def throughput(root: Path, rounds: int) -> dict:
    from naive_model.config import StrategyConfig
    from naive_model.distribute import make_strategy
    from naive_model.streaming import map_canonical
    from naive_model.trainer import Trainer

    data = map_canonical(mnist_folder(root))
    config = TrainConfig(batch_size=128, jit_compile=True, seed=1, epochs=1000)
    strategy = make_strategy(StrategyConfig(kind="cpu"))
    trainers = {
        "in_memory": Trainer(config, data, strategy),
        "streamed": Trainer(config, data, strategy, window_batches=64),
    }
    for trainer in trainers.values():
        trainer.train_epoch()  # traces, and warms the page cache and the allocator

    # Samples per second of this process's CPU time (every thread's, user and system),
    # beside the wall-clock rate: on a machine shared with other tenants the wall
    # clock measures their load as much as the work, the CPU time only the work.
    per_cpu_second: dict[str, list[float]] = {name: [] for name in trainers}

    def epoch(name: str, trainer: Trainer):
        def timed() -> float:
            cpu = time.process_time()
            result = trainer.train_epoch()
            per_cpu_second[name].append(result.examples / (time.process_time() - cpu))
            return result.examples / result.seconds

        return timed

    before = load_average()
    samples = side_by_side({name: epoch(name, t) for name, t in trainers.items()}, rounds)
    cpu = per_cpu_second
    return {
        "samples_per_second": {k: [round(v) for v in values] for k, values in samples.items()},
        "streamed/in_memory": round(paired_ratio(samples["streamed"], samples["in_memory"]), 3),
        "samples_per_cpu_second": {k: [round(v) for v in values] for k, values in cpu.items()},
        "streamed/in_memory_per_cpu_second": round(
            paired_ratio(cpu["streamed"], cpu["in_memory"]), 3
        ),
        "target": ">= 0.9",
        "config": "MNIST, batch 128, layers 512 relu + 10 softmax, rmsprop, XLA, one CPU device",
        "rounds": rounds,
        "load_average": {"before": before, "after": load_average()},
    }


# -- peak resident memory of a worker ------------------------------------------------


def rss_child(folder: Path, mode: str) -> None:
    """In a fresh interpreter: the worker's train task on `folder`; prints its peak."""
    from service.protocol import JobSpec, Running, TrainTask
    from service.worker import tasks

    layers = (LayerSpec(units=64, activation="relu"), LayerSpec(units=10, activation="softmax"))
    spec = JobSpec(
        train=TrainConfig(layers=layers, batch_size=128, epochs=1, seed=1),
        dataset="mnist-tiled",
        strategy="cpu",
        data_mode=mode,
    )
    plan = []
    with tempfile.TemporaryDirectory() as job_dir:
        task = TrainTask(
            job_id="job-rss",
            job_dir=Path(job_dir),
            spec=spec,
            strategy="cpu",
            replicas=1,
            cuda_visible_devices="",
            gpu_names=(),
            data_dir=None,
            dataset_dir=folder,
            data_budget_bytes=BUDGET,
        )

        def send(event) -> None:
            if type(event).__name__ == "Failed":
                raise RuntimeError(event.reason)
            if isinstance(event, Running):
                plan.append(event.data)

        tasks.train(task, send, lambda: False)
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_mib": round(peak / 1024, 1), "data": plan[0]}))


def rss(root: Path) -> dict:
    # "auto": the worker itself chooses to stream, the data set passing the budget.
    runs = [("auto", tiles) for tiles in TILES] + [("memory", tiles) for tiles in HELD_TILES]
    before = load_average()
    entries = {}
    for mode, tiles in runs:
        folder = mnist_folder(root, tiles)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.datasets", "--rss-child", str(folder), mode],
            capture_output=True,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=""),
        )
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        entry = json.loads(done.stdout.strip().splitlines()[-1])
        entry["seconds"] = round(time.perf_counter() - start, 1)
        entries[f"{mode}_x{tiles}"] = entry
    streamed = [entries[f"auto_x{tiles}"]["peak_mib"] for tiles in TILES]
    return {
        "entries": entries,
        "streamed_spread": round(max(streamed) / min(streamed) - 1, 3),
        "target": "streamed peaks within 10% of each other",
        "config": "one epoch (evaluation, checkpoint, export), layers 64 relu + 10 softmax, "
        "batch 128, 64 MiB data budget",
        "load_average": {"before": before, "after": load_average()},
    }


# -- upload ------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (utime and stime of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def upload(root: Path, size: int = 2**30) -> dict:
    import grpc
    from ntrain.v1 import training_pb2 as pb

    from ntrain.client import Client

    state, port_file = root / "upload-state", root / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen(
        [
            sys.executable, "-m", "service.cli", "serve", "--port", "0", "--no-metrics",
            "--no-warm-worker", "--state-dir", str(state), "--port-file", str(port_file),
            "--max-dataset-bytes", str(2 * size),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        port = int(port_file.read_text())
        chunk = np.random.default_rng(0).integers(0, 256, 2**20, dtype=np.uint8).tobytes()
        header = pb.DatasetUpload(
            name="big", size_bytes=size, sha256="0" * 64, format="npy"
        )  # a wrong digest: every byte is received and hashed, nothing is converted

        def requests():
            yield pb.UploadDatasetRequest(header=header)
            for _ in range(size // len(chunk)):
                yield pb.UploadDatasetRequest(chunk=chunk)

        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                samples.append(_rss_mib(server.pid))

        with Client(f"127.0.0.1:{port}") as client:
            client.datasets()  # the server is up and has answered once
            idle = _rss_mib(server.pid)
            sampler = threading.Thread(target=sample, daemon=True)
            before = load_average()
            cpu_before = _cpu_seconds(server.pid), _cpu_seconds(os.getpid())
            sampler.start()
            start = time.perf_counter()
            try:
                client._stub.UploadDataset(requests(), timeout=600)
                raise RuntimeError("the server took a wrong digest")
            except grpc.RpcError as refused:
                assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
            seconds = time.perf_counter() - start
            server_cpu = _cpu_seconds(server.pid) - cpu_before[0]
            client_cpu = _cpu_seconds(os.getpid()) - cpu_before[1]
            done.set()
            sampler.join()
        return {
            "bytes": size,
            "seconds": round(seconds, 2),
            "MB_per_second": round(size / seconds / 1e6, 1),
            "target_MB_per_second": ">= 100",
            # CPU the two ends used: transfer per CPU-second of the busier end is what
            # an idle machine would allow, where other tenants share the cores.
            "cpu_seconds": {"server": round(server_cpu, 2), "client": round(client_cpu, 2)},
            "MB_per_server_cpu_second": round(size / server_cpu / 1e6, 1),
            "server_rss_mib": {"idle": round(idle, 1), "peak": round(max(samples), 1)},
            "server_rss_growth_mib": round(max(samples) - idle, 1),
            "target_growth_mib": "< 64",
            "load_average": {"before": before, "after": load_average()},
        }
    finally:
        server.terminate()
        server.wait(30)


# -- conversion ----------------------------------------------------------------------


def conversion(root: Path, rows: int = 240_000) -> dict:
    """CSV and Parquet files of MNIST rows (repeated), converted by the conversion worker."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from service.processes.conversion_process import convert_in_worker
    from service.protocol import Converted, ConvertTask

    with np.load(SHARED_MNIST) as mnist:
        repeats = -(-rows // 60000)
        x = np.tile(mnist["x_train"].reshape(60000, 784), (repeats, 1))[:rows]
        y = np.tile(mnist["y_train"].astype(np.int64), repeats)[:rows]
    columns = {f"p{i}": x[:, i] for i in range(784)} | {"label": y}
    table = pa.table(columns)
    files = {"csv": root / "mnist.csv", "parquet": root / "mnist.parquet"}
    pacsv.write_csv(table, files["csv"])
    pq.write_table(table, files["parquet"])
    del table, columns, x, y
    before = load_average()
    entries = {}
    for kind, path in files.items():
        folder = root / f"converted-{kind}"
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        answer = convert_in_worker(
            ConvertTask(source=path, folder=folder, format=kind, label_column="label")
        )
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
        if not isinstance(answer, Converted):
            raise RuntimeError(answer)
        size = path.stat().st_size
        entries[kind] = {
            "bytes": size,
            "rows": rows,
            "seconds": round(seconds, 2),
            "seconds_per_GB": round(seconds / (size / 1e9), 1),
            # The worker's own CPU time: what the conversion costs where it has the cores.
            "cpu_seconds": round(cpu, 2),
            "cpu_seconds_per_GB": round(cpu / (size / 1e9), 1),
        }
    return {
        "entries": entries,
        "note": "the seconds include starting the conversion worker and writing the split",
        "load_average": {"before": before, "after": load_average()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.datasets")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run these sections")
    parser.add_argument("--rounds", type=int, default=9, help="throughput rounds (default 9)")
    parser.add_argument("--work-dir", type=Path, help="for the files (default a temporary one)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, to check the harness: a 64 MiB upload, 6000 rows to convert",
    )
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(Path(args.rss_child[0]), args.rss_child[1])
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        root = Path(work)
        results: dict = {}
        for section in args.only or SECTIONS:
            start = time.perf_counter()
            if section == "throughput":
                results[section] = throughput(root, args.rounds)
            elif section == "rss":
                results[section] = rss(root)
            elif section == "upload":
                results[section] = upload(root, 64 * MIB if args.quick else 2**30)
            else:
                results[section] = conversion(root, 6000 if args.quick else 240_000)
            results[section]["section_seconds"] = round(time.perf_counter() - start, 1)
            print(json.dumps({section: results[section]}), file=sys.stderr, flush=True)
        results["machine"] = machine()
        publish(results, args.json)


if __name__ == "__main__":
    main()
