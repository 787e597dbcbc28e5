"""Multi_worker jobs on 1 and 2 Ray hosts of this machine: set-up time, epoch time.

    sudo .venv/bin/python -m benchmarks.ray_scaling --json benchmarks/results/ray_scaling.json

Run from a checkout, as root (it starts the two-node cluster of the tests,
tests/ray_cluster.py, in a network namespace), with the ray extra installed.
Inside the namespace it starts `ntrain serve --ray-address`, then runs the
same 3-epoch job (8192 synthetic examples of 64 features, 64-32-10, global
batch 64, 8 steps per call) on 2 hosts, 1 host, and 2 hosts again, and
reports for each: submit to first progress, submit to SUCCEEDED, each
epoch's seconds, and the set-up lines the driver and its workers log.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOSTS = (2, 1, 2)


def measure_inside(ray_address: str, work: Path) -> dict:
    """In the namespace: a server and one job per entry of HOSTS."""
    sys.path.insert(0, str(REPO / "tests"))
    from ray_scenario_main import follow, ray_logs, spec

    from ntrain.client import Client

    port_file = work / "port"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "ntrain"),
            "serve",
            "--port=0",
            f"--port-file={port_file}",
            f"--state-dir={work / 'state'}",
            f"--data-dir={work / 'data'}",
            f"--ray-address={ray_address}",
            "--no-metrics",
            "--no-warm-worker",
        ],
        stdout=open(work / "server.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    runs = []
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        client = Client(f"127.0.0.1:{port_file.read_text().strip()}", timeout=30)
        for hosts in HOSTS:
            job_spec = spec(epochs=3)
            job_spec["strategy"]["hosts"] = hosts
            submitted = time.monotonic()
            job = client.submit(job_spec)
            seen = follow(client, job.job_id, submitted)
            setup = [
                line.split("ntrain: ", 1)[1]
                for line in ray_logs(ray_address, job.job_id).splitlines()
                if "ntrain: " in line and " after " in line
            ]
            runs.append(
                {
                    "hosts": hosts,
                    "state": client.get(job.job_id).state,
                    "first_progress_s": round(seen["first_progress_s"], 1),
                    "succeeded_s": round(seen["end_s"], 1),
                    "epoch_seconds": seen["epoch_seconds"],
                    "setup": sorted(set(setup)),
                }
            )
    finally:
        server.terminate()
        server.wait(60)
    return {"runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--inside", nargs=3, metavar=("RAY_ADDRESS", "WORK", "OUT"))
    args = parser.parse_args()
    if args.inside:
        ray_address, work, out = args.inside
        Path(out).write_text(json.dumps(measure_inside(ray_address, Path(work))))
        return

    import shutil
    import tempfile

    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from ray_cluster import RAY_ADDRESS, NetnsRayCluster

    from naive_model.data import synthetic_dataset

    work = Path(tempfile.mkdtemp(prefix="ntrain-ray-bench-"))
    (work / "data").mkdir()
    blobs = synthetic_dataset(num_train=8192, num_test=512, input_size=64, seed=5)
    np.savez(
        work / "data" / "blobs.npz",
        x_train=blobs.x_train,
        y_train=blobs.y_train,
        x_test=blobs.x_test,
        y_test=blobs.y_test,
    )
    cluster = NetnsRayCluster(work)
    out = work / "figures.json"
    try:
        cluster.start()
        command = [sys.executable, "-m", "benchmarks.ray_scaling", "--inside"]
        subprocess.run(
            cluster.in_namespace(*command, RAY_ADDRESS, str(work), str(out)),
            env=cluster.env,
            cwd=REPO,
            timeout=1800,
            check=True,
        )
        figures = json.loads(out.read_text())
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)  # the data, and the nodes' logs (--temp-dir)
    for run in figures["runs"]:
        print(
            f"{run['hosts']} host(s): first progress {run['first_progress_s']} s, "
            f"SUCCEEDED {run['succeeded_s']} s, epochs {run['epoch_seconds']} s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
