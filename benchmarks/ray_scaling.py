"""Multi_worker jobs on 1 and 2 Ray hosts of this machine: set-up time, epoch time.

    sudo .venv/bin/python -m benchmarks.ray_scaling --json benchmarks/results/ray_scaling.json

Run from a checkout, as root (it starts the two-node cluster of the tests,
benchmarks/ray_cluster.py, in a network namespace), with the ray extra installed.
Inside the namespace it starts `ntrain serve --ray-address`, then runs the
same 3-epoch job (8192 synthetic examples of 64 features, 64-32-10, global
batch 64, 8 steps per call) on 2 hosts, 1 host, and 2 hosts again, and
reports for each: submit to first progress, submit to SUCCEEDED, each
epoch's seconds, and the set-up lines the driver and its workers log.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.ray_cluster import follow, ray_logs, ray_server, run_inside, spec, write_blobs
from ntrain.client import Client

HOSTS = (2, 1, 2)


def measure_inside(ray_address: str, work: Path) -> dict:
    """In the namespace: a server and one job per entry of HOSTS."""
    server = ray_server(work, ray_address)
    runs = []
    try:
        client = Client(server.address, timeout=30)
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
        server.stop()
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

    work = Path(tempfile.mkdtemp(prefix="ntrain-ray-bench-"))
    write_blobs(work)
    out = work / "figures.json"
    try:
        command = [sys.executable, "-m", "benchmarks.ray_scaling", "--inside"]
        done, _ = run_inside(work, command, out, timeout=1800)
        if done.returncode:
            raise SystemExit(f"the scenario failed:\n{(done.stdout + done.stderr)[-4000:]}")
        figures = json.loads(out.read_text())
    finally:
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
