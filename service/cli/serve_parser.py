"""The flags of `ntrain serve`: ports, state, limits, recovery, scheduling and security."""

from __future__ import annotations

import argparse
import os

from service.cli import commands
from service.cli.types import port, positive_int, positive_seconds, seconds


def add_serve_parser(subcommands) -> argparse.ArgumentParser:
    """Add `serve` to the command line's subcommands."""
    serve = subcommands.add_parser("serve", help="run the training server")
    serve.add_argument(
        "--port", metavar="N", type=port, default=None, help="gRPC port (default 50051; 0 = any)"
    )
    serve.add_argument(
        "--metrics-port",
        metavar="N",
        type=port,
        default=None,
        help="Prometheus /metrics port (default 9101; 0 = any)",
    )
    serve.add_argument("--no-metrics", action="store_true", help="serve no metrics endpoint")
    serve.add_argument(
        "--bind",
        metavar="ADDRESS",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    serve.add_argument(
        "--state-dir", metavar="DIR", help="jobs database and artifacts (default ./var)"
    )
    serve.add_argument(
        "--data-dir", metavar="DIR", default=None, help="directory of .npz data sets jobs may name"
    )
    serve.add_argument(
        "--max-dataset-bytes",
        metavar="BYTES",
        type=positive_int,
        default=None,
        help="the largest data set file a client may push (default 8 GiB)",
    )
    serve.add_argument(
        "--data-budget-bytes",
        metavar="N",
        type=int,
        default=None,
        help="a job whose training split takes more than this is streamed from its files in "
        "windows, not held whole on every device (data mode auto; default 0: half the "
        "host's memory)",
    )
    serve.add_argument(
        "--max-queue",
        metavar="N",
        type=positive_int,
        default=None,
        help="queued jobs before submissions are refused (default 64)",
    )
    serve.add_argument(
        "--max-queue-per-principal",
        metavar="N",
        type=positive_int,
        default=None,
        help="of those, the jobs one principal may have waiting, so that none fills the "
        "queue for the others (default 32; with --auth-tokens only)",
    )
    serve.add_argument(
        "--max-cpu-jobs",
        metavar="N",
        type=positive_int,
        default=None,
        help="CPU-only jobs running at once (default 1)",
    )
    serve.add_argument(
        "--max-model-tasks",
        metavar="N",
        type=positive_int,
        default=None,
        help="Evaluate and Predict requests running or waiting for the inference worker at "
        "once; more are refused (default 8)",
    )
    serve.add_argument(
        "--model-cache",
        metavar="N",
        type=positive_int,
        default=None,
        help="trained models the inference worker keeps loaded for Evaluate and Predict, "
        "least recently used dropped first (default 4)",
    )
    serve.add_argument(
        "--jobs-per-gpu",
        metavar="N",
        type=positive_int,
        default=None,
        help="one-GPU jobs that fit a 1/N share of a GPU's memory may share it, N at most, "
        "each under a TensorFlow memory limit (default 1: no sharing)",
    )
    serve.add_argument(
        "--backfill-seconds",
        metavar="SECONDS",
        type=float,
        default=None,
        help="how long a waiting GPU job lets younger jobs that fit pass before it "
        "reserves GPUs (default 600)",
    )
    serve.add_argument(
        "--preemption-grace",
        metavar="SECONDS",
        type=seconds,
        default=None,
        help="how long a job preempted by a more urgent one may take to checkpoint at its "
        "next compiled call's end before it is killed; it resumes from its last checkpoint "
        "(default 60)",
    )
    serve.add_argument(
        "--min-run",
        metavar="SECONDS",
        type=seconds,
        default=None,
        help="a job resumed after a preemption runs at least this long before another "
        "(default 120)",
    )
    serve.add_argument(
        "--hang-seconds",
        metavar="SECONDS",
        type=seconds,
        default=None,
        help="a job's worker that sends nothing this long (it says it is alive every few "
        "seconds, whatever its compiled calls do) is killed and restarted from its checkpoint "
        "(default 120; 0: never)",
    )
    serve.add_argument(
        "--progress-interval",
        metavar="SECONDS",
        type=seconds,
        default=None,
        help="a job's history (WatchJob, GetJob) keeps at most one progress report per this "
        "many seconds, and every epoch's last; Prometheus counts every compiled call "
        "(default 0.25; 0: every report)",
    )
    serve.add_argument(
        "--auto-gpu-wait",
        metavar="SECONDS",
        type=float,
        default=None,
        help="how long an auto job waits for a GPU before it runs on the CPU (default 300)",
    )
    serve.add_argument(
        "--no-warm-worker",
        action="store_true",
        help="do not keep a worker with TensorFlow imported ready",
    )
    serve.add_argument(
        "--job-series-retention",
        metavar="SECONDS",
        type=positive_seconds,
        default=None,
        help="how long a finished job's Prometheus series stay (default 600)",
    )
    serve.add_argument(
        "--max-streams",
        metavar="N",
        type=positive_int,
        default=None,
        help="WatchJob, GetJobLogs and DownloadModel streams open at once, each on a thread "
        "of its own (default 512)",
    )
    serve.add_argument(
        "--max-streams-per-principal",
        metavar="N",
        type=positive_int,
        default=None,
        help="of those, the streams one principal may hold, so that none locks the others "
        "out (default 128, at most --max-streams; without --auth-tokens every caller is one)",
    )
    serve.add_argument(
        "--stream-send-timeout",
        metavar="SECONDS",
        type=positive_seconds,
        default=None,
        help="drop a stream whose client has taken no message for this long: a reader that "
        "stopped reading holds a thread and a slot until then (default 30)",
    )
    serve.add_argument(
        "--stream-max-age",
        metavar="SECONDS",
        type=seconds,
        default=None,
        help="end a watch or a log follow after this long and a random half of it more; "
        "ntrain's clients reconnect at once where they were, and one that stopped reading "
        "is dropped whatever its window (default 600; 0: never)",
    )
    serve.add_argument(
        "--checkpoint-seconds",
        metavar="SECONDS",
        type=positive_seconds,
        default=None,
        help="also checkpoint running jobs this often, between compiled calls (default 300)",
    )
    serve.add_argument(
        "--shutdown-grace",
        metavar="SECONDS",
        type=positive_seconds,
        default=None,
        help="on SIGTERM, how long running jobs get to checkpoint before their workers "
        "are killed (default 30); they resume on the next start",
    )
    serve.add_argument(
        "--port-file",
        metavar="PATH",
        default=None,
        help="write the bound gRPC port to this file once serving",
    )
    serve.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop as on SIGTERM when the process that started this one ends (for a "
        "wrapper such as the demo, which cannot stop its server when it is SIGKILLed)",
    )
    ray = serve.add_argument_group(
        "ray",
        "multi_worker jobs run on a Ray cluster; the state directory must be shared "
        "with its nodes at the same path",
    )
    ray.add_argument(
        "--ray-address",
        metavar="URL",
        default=os.environ.get("NTRAIN_RAY_ADDRESS") or None,
        help="Ray Jobs on the cluster's head, http://HOST:8265 (default $NTRAIN_RAY_ADDRESS; "
        "without it multi_worker jobs are refused)",
    )
    ray.add_argument(
        "--ray-token-file",
        metavar="FILE",
        default=None,
        help="the token of Ray's token authentication mode",
    )
    serve.add_argument(
        "--mlflow-tracking-uri",
        metavar="URL",
        default=None,
        help="log one MLflow run per job to this tracking server, http://HOST:5000 (the "
        "mlflow extra); a job's label mlflow=off opts it out",
    )
    security = serve.add_argument_group(
        "security",
        "SIGHUP re-reads every file below without stopping a job. An address other than "
        "loopback needs TLS and authentication on both ports, or --insecure.",
    )
    security.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate")
    security.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    security.add_argument(
        "--tls-client-ca", metavar="FILE", help="require client certificates signed by this CA"
    )
    security.add_argument(
        "--auth-tokens",
        metavar="FILE",
        help="require a bearer token from this file's principals (NAME ROLE HASH lines; "
        "see ntrain token new)",
    )
    security.add_argument(
        "--no-reflection", action="store_true", help="do not offer gRPC server reflection"
    )
    security.add_argument("--metrics-tls-cert", metavar="FILE", help="serve /metrics over TLS")
    security.add_argument("--metrics-tls-key", metavar="FILE", help="its private key")
    security.add_argument(
        "--metrics-tls-client-ca", metavar="FILE", help="require scrapers' client certificates"
    )
    security.add_argument(
        "--metrics-basic-auth",
        metavar="FILE",
        help="require basic auth on /metrics from this file's users (NAME HASH lines; "
        "see ntrain token hash)",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="serve on an address other than loopback without TLS or authentication",
    )
    serve.set_defaults(run=commands.cmd_serve)
    return serve
