"""The ntrain command line's parser: every command, its flags, defaults and help."""

from __future__ import annotations

import argparse
import os

from naive_model.config import INITIALIZERS, OPTIMIZERS, PRECISIONS, TrainConfig
from ntrain.client import ADDRESS_ENV, DEFAULT_ADDRESS, MODEL_TIMEOUT, QUICK_TIMEOUT
from ntrain.client.channel import (
    TLS_CA_ENV,
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
)
from ntrain.client.states import STATE_NAMES
from service.cli import commands, experiment_commands
from service.cli.exit_status import EXIT_USAGE
from service.cli.inputs import format_layers, parse_layers
from service.cli.serve_parser import add_serve_parser
from service.cli.store_admin import add_store_parser
from service.cli.types import label, positive_int, priority_value
from service.protocol import SERVICE_STRATEGIES

JOB_STATE_NAMES = list(STATE_NAMES)


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit with status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_EXAMPLES = """examples:
  ntrain serve --state-dir var &            a server on 127.0.0.1:50051
  ntrain train --epochs 2                   MNIST, 784 -> 512 relu -> 10 softmax
  JOB=$(ntrain train --detach --dataset synthetic)
  ntrain watch $JOB                         follow it (exit 0 when it SUCCEEDED)
  ntrain train -f job.json --label team=vision
  ntrain jobs --state RUNNING --label team=vision
  ntrain describe $JOB                      spec, states and why, result, model
  ntrain logs -f $JOB                       the worker's log, as it is written
  ntrain model $JOB -o models/mnist         models/mnist/1/saved_model.pb for TF Serving
  ntrain eval $JOB
  ntrain predict $JOB --mnist-test 5 --show
  ntrain cancel $JOB

With TLS and tokens (see README, Security):
  ntrain serve --tls-cert server.crt --tls-key server.key --auth-tokens tokens
  ntrain jobs --tls-ca ca.crt --token-file alice.token

Each command has --help. Errors are one line on stderr and a non-zero exit."""


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="ntrain",
        description="Train the naive Dense/Sequential network through the ntrain gRPC service.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ntrain {commands.version()}")
    subcommands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_OneLineParser
    )
    subcommands.required = True

    client = _OneLineParser(add_help=False)
    client.add_argument(
        "--address",
        metavar="HOST:PORT",
        default=os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
        help=f"server host:port (default ${ADDRESS_ENV} or {DEFAULT_ADDRESS})",
    )
    client.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=None,
        help=f"seconds to wait for an answer (default {QUICK_TIMEOUT:g}; "
        f"{MODEL_TIMEOUT:g} for eval and predict)",
    )
    client.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=None,
        help=f"connect with TLS, trusting this CA certificate (default ${TLS_CA_ENV})",
    )
    client.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=None,
        help=f"client certificate, for a server that asks for one (default ${TLS_CERT_ENV})",
    )
    client.add_argument(
        "--tls-key",
        metavar="FILE",
        default=None,
        help=f"the client certificate's key (default ${TLS_KEY_ENV})",
    )
    client.add_argument(
        "--token-file",
        metavar="FILE",
        default=None,
        help=f"file holding the bearer token (default ${TOKEN_ENV}, the token itself, "
        f"then ${TOKEN_FILE_ENV})",
    )
    as_json = _OneLineParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of text")

    add_serve_parser(subcommands)
    add_store_parser(subcommands)

    token = subcommands.add_parser(
        "token", help="make bearer tokens, and the hashes of metrics passwords"
    )
    token_commands = token.add_subparsers(
        dest="token_command", metavar="ACTION", parser_class=_OneLineParser
    )
    token_commands.required = True
    new_token = token_commands.add_parser(
        "new",
        help="add a principal to a token file and print its new token",
        description="Appends NAME ROLE HASH to the token file (made 0600 if new) and prints "
        "the token on standard output, once: the file keeps only its hash. SIGHUP the "
        "server to use it.",
    )
    new_token.add_argument("name", metavar="NAME", help="the principal (a job's owner)")
    new_token.add_argument(
        "--role", required=True, choices=("viewer", "trainer", "admin"), help="what it may do"
    )
    new_token.add_argument(
        "--auth-tokens", metavar="FILE", required=True, help="the server's token file"
    )
    new_token.add_argument(
        "--max-priority",
        metavar="CLASS|N",
        type=priority_value,
        default=None,
        help="the highest priority its jobs may have (a trainer's; default high)",
    )
    new_token.set_defaults(run=commands.cmd_token_new)
    hash_token = token_commands.add_parser(
        "hash",
        help="print the scrypt hash of a metrics password read from standard input",
        description="For NAME HASH lines of --metrics-basic-auth. Bearer tokens come from "
        "ntrain token new only: the server checks them by a fast hash, safe for their 256 "
        "random bits and not for a token chosen by hand.",
    )
    hash_token.set_defaults(run=commands.cmd_token_hash)

    _add_data_parser(subcommands, client, as_json)

    defaults = TrainConfig()
    train = subcommands.add_parser(
        "train",
        parents=[client],
        help="submit a job and follow it",
        description="Submit a training job and follow it. Flags not given take the job "
        "file's values (-f), else the server's defaults: the book's network and training "
        "(shown below).",
    )
    train.add_argument(
        "-f",
        "--file",
        metavar="PATH",
        default=None,
        help="a JobSpec in the proto3 JSON mapping (.json; .yaml/.yml with PyYAML "
        "installed); flags given override its fields",
    )
    train.add_argument(
        "--name", metavar="NAME", default=None, help="a name for people (not unique)"
    )
    train.add_argument(
        "--label",
        metavar="KEY=VALUE",
        type=label,
        action="append",
        default=None,
        help="a label to find the job by (repeatable; ntrain jobs --label)",
    )
    train.add_argument(
        "--layers",
        metavar="SPEC",
        type=parse_layers,
        default=None,
        help=f"UNITS:ACTIVATION,... (default {format_layers(defaults.layers)})",
    )
    train.add_argument(
        "--init",
        choices=INITIALIZERS,
        default=None,
        help=f"weight initialiser (default {defaults.initializer})",
    )
    train.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=None,
        help=f"(default {defaults.optimizer})",
    )
    train.add_argument(
        "--lr",
        metavar="RATE",
        type=float,
        default=None,
        help=f"learning rate (default {defaults.learning_rate:g})",
    )
    train.add_argument(
        "--momentum",
        metavar="M",
        type=float,
        default=None,
        help="for sgd and momentum (default 0: plain sgd, 0.9 for momentum)",
    )
    train.add_argument(
        "--batch-size",
        metavar="N",
        type=int,
        default=None,
        help=f"global batch size (default {defaults.batch_size})",
    )
    train.add_argument(
        "--epochs",
        metavar="N",
        type=int,
        default=None,
        help=f"(default {defaults.epochs})",
    )
    train.add_argument(
        "--dataset",
        metavar="NAME",
        default=None,
        help="mnist, synthetic, or a file in the server's data dir (default mnist)",
    )
    train.add_argument(
        "--strategy",
        choices=SERVICE_STRATEGIES,
        default=None,
        help="distribution strategy (default auto)",
    )
    train.add_argument(
        "--devices",
        metavar="N",
        type=int,
        default=None,
        help="GPUs the job asks for (default 0: the strategy's default)",
    )
    train.add_argument(
        "--steps-per-execution",
        metavar="N",
        type=int,
        default=None,
        help="steps per compiled call (default 0: a whole epoch)",
    )
    train.add_argument("--jit", action="store_true", default=None, help="compile with XLA")
    train.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help=f"compute dtype; weights stay float32 (default {defaults.precision})",
    )
    train.add_argument(
        "--data-mode",
        choices=("auto", "memory", "stream"),
        default=None,
        help="hold the training data whole, or stream it from its files in windows "
        "(default auto: stream when it passes the job's data budget)",
    )
    train.add_argument("--seed", metavar="N", type=int, default=None, help="(default 0)")
    train.add_argument(
        "--checkpoint-every",
        metavar="N",
        type=int,
        default=None,
        help="epochs between checkpoints (default 1; 0: at the end only)",
    )
    train.add_argument(
        "--max-restarts",
        metavar="N",
        type=int,
        default=None,
        help="restarts from the last checkpoint when the worker dies (default 2)",
    )
    train.add_argument(
        "--priority",
        metavar="CLASS|N",
        type=priority_value,
        default=None,
        help="low, normal or high, or a number in -1000..1000: larger runs first and may "
        "preempt smaller (default normal)",
    )
    train.add_argument(
        "--max-runtime",
        metavar="SECONDS",
        type=float,
        default=None,
        help="seconds before the job fails (default 0: no limit)",
    )
    train.add_argument(
        "--request-id",
        metavar="ID",
        default=None,
        help="idempotency key: resubmitting it returns the same job",
    )
    train.add_argument("--detach", action="store_true", help="print the job id and return")
    train.set_defaults(run=commands.cmd_train)

    jobs = subcommands.add_parser("jobs", parents=[client, as_json], help="list jobs, newest first")
    jobs.add_argument(
        "--state",
        action="append",
        type=str.upper,
        choices=JOB_STATE_NAMES,
        help="only jobs in this state (repeatable)",
    )
    jobs.add_argument(
        "--label",
        metavar="KEY=VALUE",
        type=label,
        action="append",
        help="only jobs with this label (repeatable: every one must match)",
    )
    jobs.add_argument(
        "--limit", metavar="N", type=positive_int, default=20, help="at most N jobs (default 20)"
    )
    jobs.set_defaults(run=commands.cmd_jobs)

    sweep = subcommands.add_parser(
        "sweep",
        parents=[client],
        help="run a hyperparameter search (an experiment) from a sweep file",
        description="Each trial is a job labelled experiment=EXP and trial=N. The file is an "
        "ExperimentSpec in the proto3 JSON mapping, as YAML or JSON (README: Experiments).",
    )
    sweep.add_argument("-f", "--file", metavar="FILE", required=True, help="the sweep file")
    sweep.add_argument("--name", default=None, help="a name for people (over the file's)")
    sweep.add_argument("--detach", action="store_true", help="print the experiment id and return")
    sweep.set_defaults(run=experiment_commands.cmd_sweep)

    experiments = subcommands.add_parser(
        "experiments", parents=[client, as_json], help="list experiments, newest first"
    )
    experiments.add_argument(
        "--limit", metavar="N", type=positive_int, default=20, help="at most N (default 20)"
    )
    experiments.set_defaults(run=experiment_commands.cmd_experiments)

    describe = subcommands.add_parser(
        "describe",
        parents=[client, as_json],
        help="one job in full (spec, states and why, progress, result, model), or one "
        "experiment with its trials sorted by the metric",
    )
    describe.add_argument("job_id", metavar="JOB|EXP")
    describe.set_defaults(run=commands.cmd_describe)

    logs = subcommands.add_parser(
        "logs", parents=[client], help="print a job's training log (its worker's output)"
    )
    logs.add_argument("job_id", metavar="JOB")
    logs.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="go on printing lines as they are written, until the job ends",
    )
    logs.set_defaults(run=commands.cmd_logs)

    model = subcommands.add_parser(
        "model",
        parents=[client],
        help="download a job's SavedModel (an experiment's: its best trial's), laid out as "
        "TF Serving expects",
        description="Writes DIR/VERSION/saved_model.pb and DIR/VERSION/variables/: point "
        "TF Serving's --model_base_path at DIR, or tf.saved_model.load(DIR/VERSION).",
    )
    model.add_argument("job_id", metavar="JOB|EXP")
    model.add_argument(
        "-o", "--output", metavar="DIR", required=True, help="the model's base folder"
    )
    model.add_argument(
        "--version",
        metavar="N",
        type=positive_int,
        default=1,
        help="the version folder to write (default 1; it must not exist yet)",
    )
    model.set_defaults(run=commands.cmd_model, default_timeout=MODEL_TIMEOUT)

    watch = subcommands.add_parser("watch", parents=[client], help="follow a job until it ends")
    watch.add_argument("job_id", metavar="JOB")
    watch.set_defaults(run=commands.cmd_watch)

    cancel = subcommands.add_parser(
        "cancel",
        parents=[client],
        help="cancel a queued or running job, or an experiment (and its running trials)",
    )
    cancel.add_argument("job_id", metavar="JOB|EXP")
    cancel.set_defaults(run=commands.cmd_cancel)

    evaluate = subcommands.add_parser(
        "eval", parents=[client, as_json], help="loss and accuracy of a job's model on a test split"
    )
    evaluate.add_argument("job_id", metavar="JOB")
    evaluate.add_argument(
        "--dataset", metavar="NAME", default=None, help="another data set (default the job's)"
    )
    evaluate.add_argument(
        "--checkpoint",
        action="store_true",
        help="use the latest checkpoint instead of the final model",
    )
    evaluate.set_defaults(run=commands.cmd_eval, default_timeout=MODEL_TIMEOUT)

    prediction = subcommands.add_parser(
        "predict", parents=[client, as_json], help="classify inputs with a job's model"
    )
    prediction.add_argument("job_id", metavar="JOB")
    source = prediction.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", metavar="PATH", help=".npy or .npz of inputs (an .npz may carry labels)"
    )
    source.add_argument(
        "--mnist-test", type=positive_int, metavar="N", help="the first N MNIST test images"
    )
    prediction.add_argument(
        "--mnist-file",
        metavar="PATH",
        default=None,
        help="mnist.npz for --mnist-test (default $NTRAIN_MNIST_PATH, then "
        "~/.keras/datasets/mnist.npz)",
    )
    prediction.add_argument(
        "--limit",
        metavar="N",
        type=positive_int,
        default=None,
        help="only the first N inputs of --input",
    )
    prediction.add_argument(
        "--show", action="store_true", help="draw each input as ASCII art beside its prediction"
    )
    prediction.set_defaults(run=commands.cmd_predict, default_timeout=MODEL_TIMEOUT)

    info = subcommands.add_parser(
        "info", parents=[client, as_json], help="server version and devices"
    )
    info.set_defaults(run=commands.cmd_info)

    health = subcommands.add_parser(
        "health", parents=[client], help="exit 0 when the server reports SERVING, else 1"
    )
    health.add_argument(
        "--service", metavar="NAME", default="", help="service name to check (default: the server)"
    )
    health.set_defaults(run=commands.cmd_health, default_timeout=5.0)

    completion = subcommands.add_parser(
        "completion",
        help="print a shell completion script (needs shtab: pip install 'ntrain[completion]')",
        description="bash: ntrain completion bash > ~/.local/share/bash-completion/completions/"
        "ntrain; zsh: ntrain completion zsh > a folder of your $fpath, named _ntrain.",
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(run=lambda args: commands.cmd_completion(args, parser))
    return parser


def _add_data_parser(subcommands, client, as_json) -> None:
    """`ntrain data push|ls|describe|rm`: the data sets pushed to the server."""
    data = subcommands.add_parser("data", help="push, list, describe and delete data sets")
    actions = data.add_subparsers(
        dest="data_command", metavar="ACTION", parser_class=_OneLineParser
    )
    actions.required = True
    push = actions.add_parser(
        "push",
        parents=[client, as_json],
        help="upload a data set file (.npz, .npy x and y, .csv, .parquet)",
        description="Uploads the file; the server checks it, converts it once and names the "
        "version NAME@sha256:<digest>. A job's --dataset NAME trains on the newest version.",
    )
    push.add_argument("files", metavar="FILE", nargs="+", help="one file, or .npy files x y")
    push.add_argument("--name", required=True, help="the data set's name")
    push.add_argument("--label-column", default="", help="csv and parquet: the label column")
    push.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="share of rows held out for testing when the file has no test split (default 0.1)",
    )
    push.add_argument(
        "--num-classes", type=int, default=0, help="labels lie in [0, N) (default: the largest + 1)"
    )
    push.add_argument(
        "--format", choices=("npz", "npy", "csv", "parquet"), help="default: from the suffix"
    )
    push.set_defaults(run=commands.cmd_data_push)
    listing = actions.add_parser(
        "ls", parents=[client, as_json], help="list data sets, newest push first"
    )
    listing.add_argument("name", metavar="NAME", nargs="?", default="", help="only its versions")
    listing.set_defaults(run=commands.cmd_data_ls)
    describe = actions.add_parser(
        "describe", parents=[client, as_json], help="one data set version in full"
    )
    describe.add_argument("dataset", metavar="NAME[@sha256:DIGEST]")
    describe.set_defaults(run=commands.cmd_data_describe)
    remove = actions.add_parser(
        "rm", parents=[client, as_json], help="delete a version, or every version of a name"
    )
    remove.add_argument("dataset", metavar="NAME[@sha256:DIGEST]")
    remove.set_defaults(run=commands.cmd_data_rm)
