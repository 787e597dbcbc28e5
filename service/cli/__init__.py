"""The ntrain command line: run the server, submit and follow jobs, evaluate, predict.

    ntrain serve                        run a server (127.0.0.1:50051, metrics on :9101)
    ntrain train --epochs 2             submit a job and follow it with a progress bar
    ntrain jobs | watch | cancel | eval | predict | info | health

Client commands talk to --address (default $NTRAIN_ADDRESS or 127.0.0.1:50051).
Every failure is one line on standard error and a non-zero exit status; set
NTRAIN_DEBUG=1 to see a traceback for an unexpected one.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
from ntrain.v1 import training_pb2, training_pb2_grpc

from naive_model.config import INITIALIZERS, OPTIMIZERS, TrainConfig
from service import cli_output
from service.progress import ProgressRenderer

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_ENV = "NTRAIN_ADDRESS"
DEBUG_ENV = "NTRAIN_DEBUG"

EXIT_OK = 0
EXIT_ERROR = 1  # a failed request, or a job that did not succeed
EXIT_USAGE = 2  # bad command-line arguments
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT

# The service schedules on one host; multi_worker is for library users.
SERVICE_STRATEGIES = ("auto", "cpu", "gpu", "mirrored")
JOB_STATE_NAMES = [name for name in training_pb2.JobState.keys() if name != "JOB_STATE_UNSPECIFIED"]
TERMINAL_STATES = frozenset({training_pb2.SUCCEEDED, training_pb2.FAILED, training_pb2.CANCELED})
# Predict sends inputs in chunks that stay well under gRPC's 4 MiB message limit.
PREDICT_CHUNK = 500
# Seconds for quick requests, and for Evaluate/Predict, which run a worker process.
QUICK_TIMEOUT = 30.0
MODEL_TIMEOUT = 300.0
# How long `watch` keeps trying to reconnect after the stream drops.
RECONNECT_SECONDS = 60.0


class CliError(Exception):
    """A failure to report as one line, with the exit status to use."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


# --- errors -------------------------------------------------------------------------------


def describe_rpc_error(error: grpc.RpcError, address: str, timeout: float | None = None) -> str:
    """A one-line, human message for a failed RPC."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = " ".join(str(error.details() or "").split()) if hasattr(error, "details") else ""
    status = grpc.StatusCode
    if code == status.UNAVAILABLE:
        if "connection refused" in details.lower():
            return f"the server is not reachable at {address} (connection refused)"
        if not details or "failed to connect" in details.lower():
            return f"the server is not reachable at {address}"
        return f"the server at {address} is unavailable: {details}"
    if code == status.DEADLINE_EXCEEDED:
        within = f" within {timeout:g} s" if timeout else ""
        return f"no answer from the server at {address}{within} (try a longer --timeout)"
    prefixes = {
        status.INVALID_ARGUMENT: "invalid request",
        status.NOT_FOUND: "not found",
        status.ALREADY_EXISTS: "already exists",
        status.FAILED_PRECONDITION: "not possible now",
        status.RESOURCE_EXHAUSTED: "the server is busy",
        status.PERMISSION_DENIED: "permission denied",
        status.UNAUTHENTICATED: "not authenticated",
        status.CANCELLED: "request cancelled",
        status.ABORTED: "aborted",
        status.OUT_OF_RANGE: "out of range",
    }
    if code == status.UNIMPLEMENTED:
        return f"the server at {address} does not offer this request (is it an ntrain server?)"
    if code in prefixes:
        return f"{prefixes[code]}: {details}" if details else prefixes[code]
    name = code.name if code is not None else "UNKNOWN"
    return f"server error ({name}): {details or 'no details'}"


def open_channel(address: str) -> grpc.Channel:
    """An insecure channel to `address`; loopback addresses never go through a proxy.

    gRPC honours $https_proxy and $http_proxy, and without a matching
    $no_proxy it would send even 127.0.0.1 through the proxy.
    """
    host = address.rsplit(":", 1)[0].strip("[]")
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    options = [("grpc.enable_http_proxy", 0)] if loopback else []
    return grpc.insecure_channel(address, options=options)


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit with status 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- building requests ----------------------------------------------------------------------


def parse_layers(text: str) -> list[training_pb2.LayerSpec]:
    """'512:relu,10:softmax' -> layer specs; a bare '512' means relu.

    The server checks units and activations; here only the shape of the text.
    """
    layers = []
    for index, item in enumerate(part.strip() for part in text.split(",")):
        units, _, activation = item.partition(":")
        try:
            count = int(units)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"layer {index} must look like UNITS:ACTIVATION (e.g. 512:relu), got {item!r}"
            ) from None
        if ":" in activation or (item.count(":") and not activation):
            raise argparse.ArgumentTypeError(
                f"layer {index} must look like UNITS:ACTIVATION (e.g. 512:relu), got {item!r}"
            )
        layers.append(training_pb2.LayerSpec(units=count, activation=activation or "relu"))
    return layers


def format_layers(layers) -> str:
    return ",".join(f"{layer.units}:{layer.activation}" for layer in layers)


def build_job_spec(args: argparse.Namespace) -> training_pb2.JobSpec:
    """The JobSpec the `train` flags describe."""
    return training_pb2.JobSpec(
        layers=args.layers,
        initializer=args.init,
        optimizer=training_pb2.OptimizerSpec(
            name=args.optimizer, learning_rate=args.lr, momentum=args.momentum
        ),
        batch_size=args.batch_size,
        epochs=args.epochs,
        dataset=args.dataset,
        strategy=training_pb2.StrategySpec(name=args.strategy, device_count=args.devices),
        steps_per_execution=args.steps_per_execution,
        jit_compile=args.jit,
        seed=args.seed,
        checkpoint_every_epochs=args.checkpoint_every,
        max_runtime_seconds=args.max_runtime,
    )


def load_inputs(path: str | Path) -> tuple[list[list[float]], list[int] | None]:
    """Inputs (and labels, when the file has them) from an .npy or .npz file.

    An .npz may hold x (or x_test, or inputs) with y (or y_test); a lone array
    is taken as the inputs. uint8 pixels are scaled to [0, 1], as the server
    scales its data sets.
    """
    import numpy as np  # only the commands that read arrays pay for numpy

    path = Path(path)
    labels = None
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                key = next((k for k in ("x", "x_test", "inputs") if k in archive.files), None)
                if key is None and len(archive.files) == 1:
                    key = archive.files[0]
                if key is None:
                    raise CliError(
                        f"{path}: no inputs; expected an array named x, x_test or inputs "
                        f"(has {', '.join(archive.files)})"
                    )
                inputs = archive[key]
                label_key = {"x": "y", "x_test": "y_test"}.get(key)
                if label_key in archive.files:
                    labels = archive[label_key]
        else:
            inputs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot read inputs from {path}: {error}") from None
    if inputs.ndim == 1:
        inputs = inputs[None, :]
    flat = inputs.reshape(len(inputs), -1)  # (examples, features)
    if flat.dtype == np.uint8:
        flat = flat.astype(np.float32) / 255.0
    if not np.issubdtype(flat.dtype, np.number):
        raise CliError(f"{path}: inputs must be numbers, got dtype {flat.dtype}")
    if labels is not None and len(labels) != len(flat):
        labels = None
    return flat.astype(np.float32).tolist(), (
        [int(label) for label in labels] if labels is not None else None
    )


def find_mnist_file(explicit: str | None) -> Path:
    """The MNIST file to take test images from: --mnist-file, else where the product looks."""
    if explicit:
        return Path(explicit)
    from naive_model.data import mnist_candidates

    candidates = mnist_candidates()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    places = ", ".join(str(candidate) for candidate in candidates)
    raise CliError(f"MNIST not found (looked in {places}); pass --mnist-file PATH")


def load_mnist_test(count: int, explicit: str | None) -> tuple[list[list[float]], list[int]]:
    """The first `count` MNIST test images, scaled to [0, 1], and their labels."""
    import numpy as np

    path = find_mnist_file(explicit)
    try:
        with np.load(path, allow_pickle=False) as archive:
            images, labels = archive["x_test"][:count], archive["y_test"][:count]
    except (OSError, KeyError, ValueError) as error:
        raise CliError(f"cannot read MNIST test images from {path}: {error}") from None
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0  # (count, 784)
    return flat.tolist(), [int(label) for label in labels]


# --- following a job ------------------------------------------------------------------------


def watch_events(
    stub: training_pb2_grpc.TrainingServiceStub,
    job_id: str,
    *,
    after_sequence: int = 0,
    reconnect_seconds: float = RECONNECT_SECONDS,
    on_reconnect: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[training_pb2.JobEvent]:
    """Every event of a job after `after_sequence`, once each, until the job ends.

    When the stream drops (the server restarted, the network hiccuped) it
    reconnects from the last sequence number seen, so nothing is missed or
    repeated, and gives up after `reconnect_seconds` without a connection.
    """
    last = after_sequence
    failing_since: float | None = None
    delay = 0.1
    while True:
        try:
            request = training_pb2.WatchJobRequest(job_id=job_id, after_sequence=last)
            for event in stub.WatchJob(request):
                failing_since, delay = None, 0.1
                if event.sequence <= last:
                    continue  # never show an event twice, whatever the server sends
                last = event.sequence
                yield event
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            now = clock()
            if failing_since is None:
                failing_since = now
                if on_reconnect is not None:
                    on_reconnect(last)
            elif now - failing_since > reconnect_seconds:
                raise
            sleep(delay)  # back off between attempts; gRPC offers no event to wait for here
            delay = min(delay * 2, 2.0)


def follow_job(
    stub: training_pb2_grpc.TrainingServiceStub,
    job: training_pb2.Job,
    renderer: ProgressRenderer,
    *,
    timeout: float = QUICK_TIMEOUT,
) -> training_pb2.Job:
    """Show a job's events until it ends; return the job as it ended."""
    epochs = job.spec.epochs
    try:
        events = watch_events(
            stub,
            job.job_id,
            on_reconnect=lambda last: renderer.line(
                f"connection lost; reconnecting from event {last}"
            ),
        )
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "state_change":
                renderer.line(cli_output.format_state_change(event.state_change))
            elif kind == "progress":
                epochs = event.progress.epochs or epochs
                renderer.progress(event.progress)
            elif kind == "epoch_end":
                renderer.epoch_end(event.epoch_end, epochs)
            elif kind == "result":
                renderer.close()
                renderer.line("result: " + cli_output.format_result(event.result))
    finally:
        renderer.close()
    return stub.GetJob(training_pb2.GetJobRequest(job_id=job.job_id), timeout=timeout)


def job_exit_status(job: training_pb2.Job) -> int:
    """0 for SUCCEEDED; otherwise say why on standard error and return 1."""
    if job.state == training_pb2.SUCCEEDED:
        return EXIT_OK
    state = cli_output.state_name(job.state)
    # A reason may be a whole TensorFlow error; its last line says what went wrong.
    lines = [line.strip() for line in job.failure_reason.splitlines() if line.strip()]
    reason = f": {lines[-1]}" if lines else ""
    raise CliError(f"job {job.job_id} ended {state}{reason}")


def _follow_or_explain(stub, job, args) -> int:
    renderer = ProgressRenderer(sys.stdout)
    try:
        ended = follow_job(stub, job, renderer, timeout=args.timeout)
    except KeyboardInterrupt:
        raise CliError(
            f"stopped following job {job.job_id}; it goes on running "
            f"(ntrain watch {job.job_id}, ntrain cancel {job.job_id})",
            EXIT_INTERRUPTED,
        ) from None
    return job_exit_status(ended)


# --- commands -------------------------------------------------------------------------------


def _stub(args) -> training_pb2_grpc.TrainingServiceStub:
    return training_pb2_grpc.TrainingServiceStub(args.channel)


def cmd_train(args) -> int:
    stub = _stub(args)
    request = training_pb2.SubmitJobRequest(
        spec=build_job_spec(args), request_id=args.request_id or uuid.uuid4().hex
    )
    job = stub.SubmitJob(request, timeout=args.timeout)
    if args.detach:
        print(job.job_id)
        return EXIT_OK
    print(
        f"job {job.job_id} submitted: {format_layers(job.spec.layers)} on {job.spec.dataset}, "
        f"{job.spec.epochs} epochs, batch {job.spec.batch_size}, "
        f"{job.spec.optimizer.name} lr {job.spec.optimizer.learning_rate:g}",
        flush=True,
    )
    return _follow_or_explain(stub, job, args)


def cmd_watch(args) -> int:
    stub = _stub(args)
    job = stub.GetJob(training_pb2.GetJobRequest(job_id=args.job_id), timeout=args.timeout)
    return _follow_or_explain(stub, job, args)


def cmd_jobs(args) -> int:
    stub = _stub(args)
    states = [training_pb2.JobState.Value(state) for state in args.state or ()]
    jobs: list[training_pb2.Job] = []
    token = ""
    while len(jobs) < args.limit:
        request = training_pb2.ListJobsRequest(
            page_size=min(args.limit - len(jobs), 1000), page_token=token, states=states
        )
        response = stub.ListJobs(request, timeout=args.timeout)
        jobs.extend(response.jobs)
        token = response.next_page_token
        if not token or not response.jobs:
            break
    jobs = jobs[: args.limit]
    if args.json:
        print(cli_output.to_json(jobs))
    elif jobs:
        print(cli_output.jobs_table(jobs))
    else:
        print("no jobs")
    return EXIT_OK


def cmd_cancel(args) -> int:
    job = _stub(args).CancelJob(
        training_pb2.CancelJobRequest(job_id=args.job_id), timeout=args.timeout
    )
    print(f"job {job.job_id}: {cli_output.state_name(job.state)}")
    return EXIT_OK


def cmd_eval(args) -> int:
    request = training_pb2.EvaluateRequest(
        job_id=args.job_id, dataset=args.dataset or "", use_checkpoint=args.checkpoint
    )
    response = _stub(args).Evaluate(request, timeout=args.timeout)
    if args.json:
        print(cli_output.to_json(response))
    else:
        print(cli_output.format_evaluation(args.job_id, response))
    return EXIT_OK


def predict(
    stub: training_pb2_grpc.TrainingServiceStub,
    job_id: str,
    inputs: Sequence[Sequence[float]],
    *,
    timeout: float,
) -> list[training_pb2.Prediction]:
    """Predictions for every input, sent in chunks that fit a gRPC message."""
    predictions: list[training_pb2.Prediction] = []
    for start in range(0, len(inputs), PREDICT_CHUNK):
        request = training_pb2.PredictRequest(
            job_id=job_id,
            inputs=[
                training_pb2.Example(values=row) for row in inputs[start : start + PREDICT_CHUNK]
            ],
        )
        predictions.extend(stub.Predict(request, timeout=timeout).predictions)
    return predictions


def cmd_predict(args) -> int:
    if args.mnist_test is not None:
        inputs, labels = load_mnist_test(args.mnist_test, args.mnist_file)
    else:
        inputs, labels = load_inputs(args.input)
        if args.limit is not None:
            inputs = inputs[: args.limit]
            labels = labels[: args.limit] if labels is not None else None
    if not inputs:
        raise CliError("no inputs to predict")
    predictions = predict(_stub(args), args.job_id, inputs, timeout=args.timeout)
    if args.json:
        print(cli_output.to_json(training_pb2.PredictResponse(predictions=predictions)))
        return EXIT_OK
    if args.show:
        for index, prediction in enumerate(predictions):
            art = cli_output.ascii_image(inputs[index])
            caption = cli_output.prediction_caption(
                prediction, labels[index] if labels is not None else None
            )
            print(
                "\n".join(caption) if art is None else cli_output.image_beside_caption(art, caption)
            )
            print()
    else:
        print(cli_output.predictions_table(predictions, labels))
    if labels is not None:
        right = sum(p.label == label for p, label in zip(predictions, labels, strict=True))
        print(f"{right}/{len(labels)} right ({cli_output.format_percent(right / len(labels))})")
    return EXIT_OK


def cmd_info(args) -> int:
    info = _stub(args).GetServerInfo(training_pb2.GetServerInfoRequest(), timeout=args.timeout)
    print(cli_output.to_json(info) if args.json else cli_output.format_server_info(info))
    return EXIT_OK


def cmd_health(args) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(args.channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return EXIT_OK if response.status == health_pb2.HealthCheckResponse.SERVING else EXIT_ERROR


def cmd_serve(args) -> int:
    from service.server import ServerConfig, TrainingServer

    # Only what was given on the command line; ServerConfig holds the defaults.
    options = {
        "bind_address": args.bind,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "state_dir": Path(args.state_dir) if args.state_dir else None,
        "data_dir": Path(args.data_dir) if args.data_dir else None,
        "max_queue": args.max_queue,
        "max_cpu_jobs": args.max_cpu_jobs,
        "warm_worker": False if args.no_warm_worker else None,
        "job_series_retention_seconds": args.job_series_retention,
    }
    config = ServerConfig(**{key: value for key, value in options.items() if value is not None})
    if args.no_metrics:
        config = dataclasses.replace(config, metrics_port=None)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = TrainingServer(config)
    try:
        try:
            server.start()
        except Exception as error:
            metrics = (
                "no metrics"
                if config.metrics_port is None
                else f"metrics port {config.metrics_port}"
            )
            raise CliError(
                f"cannot start the server (gRPC {config.bind_address}:{config.port}, {metrics}): "
                f"{error}"
            ) from None
        metrics = (
            f", metrics on http://{config.bind_address}:{server.metrics_port}/metrics"
            if server.metrics_port
            else ""
        )
        print(
            f"ntrain {_version()} ready: gRPC on {config.bind_address}:{server.port}{metrics}, "
            f"state in {config.state_dir}",
            file=sys.stderr,
            flush=True,
        )
        if args.port_file:
            _write_atomically(Path(args.port_file), f"{server.port}\n")
        while not stop.wait(0.5):  # a short wait keeps signal handling prompt
            pass
        print("ntrain: shutting down", file=sys.stderr, flush=True)
    finally:
        server.stop()  # also after a failed start: ends whatever did start
    return EXIT_OK


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the whole file or none of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ntrain")
    except Exception:  # not installed as a distribution
        return "(unknown version)"


# --- the parser -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


_EXAMPLES = """examples:
  ntrain serve --state-dir var &            a server on 127.0.0.1:50051
  ntrain train --epochs 2                   MNIST, 784 -> 512 relu -> 10 softmax
  JOB=$(ntrain train --detach --dataset synthetic)
  ntrain watch $JOB                         follow it (exit 0 when it SUCCEEDED)
  ntrain jobs --state RUNNING
  ntrain eval $JOB
  ntrain predict $JOB --mnist-test 5 --show
  ntrain cancel $JOB

Each command has --help. Errors are one line on stderr and a non-zero exit."""


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="ntrain",
        description="Train the naive Dense/Sequential network through the ntrain gRPC service.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ntrain {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    commands.required = True

    client = argparse.ArgumentParser(add_help=False)
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
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of text")

    serve = commands.add_parser("serve", help="run the training server")
    serve.add_argument(
        "--port", metavar="N", type=int, default=None, help="gRPC port (default 50051; 0 = any)"
    )
    serve.add_argument(
        "--metrics-port",
        metavar="N",
        type=int,
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
        "--max-queue",
        metavar="N",
        type=_positive_int,
        default=None,
        help="queued jobs before submissions are refused (default 64)",
    )
    serve.add_argument(
        "--max-cpu-jobs",
        metavar="N",
        type=_positive_int,
        default=None,
        help="CPU-only jobs running at once (default 1)",
    )
    serve.add_argument(
        "--no-warm-worker",
        action="store_true",
        help="do not keep a worker with TensorFlow imported ready",
    )
    serve.add_argument(
        "--job-series-retention",
        metavar="SECONDS",
        type=_positive_seconds,
        default=None,
        help="how long a finished job's Prometheus series stay (default 600)",
    )
    serve.add_argument(
        "--port-file",
        metavar="PATH",
        default=None,
        help="write the bound gRPC port to this file once serving",
    )
    serve.set_defaults(run=cmd_serve)

    defaults = TrainConfig()
    train = commands.add_parser("train", parents=[client], help="submit a job and follow it")
    train.add_argument(
        "--layers",
        metavar="SPEC",
        type=parse_layers,
        default=parse_layers(format_layers(defaults.layers)),
        help=f"UNITS:ACTIVATION,... (default {format_layers(defaults.layers)})",
    )
    train.add_argument(
        "--init",
        choices=INITIALIZERS,
        default=defaults.initializer,
        help=f"weight initialiser (default {defaults.initializer})",
    )
    train.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=defaults.optimizer,
        help=f"(default {defaults.optimizer})",
    )
    train.add_argument(
        "--lr",
        metavar="RATE",
        type=float,
        default=defaults.learning_rate,
        help=f"learning rate (default {defaults.learning_rate:g})",
    )
    train.add_argument(
        "--momentum",
        metavar="M",
        type=float,
        default=defaults.momentum,
        help="for sgd and momentum (default 0: plain sgd, 0.9 for momentum)",
    )
    train.add_argument(
        "--batch-size",
        metavar="N",
        type=int,
        default=defaults.batch_size,
        help=f"global batch size (default {defaults.batch_size})",
    )
    train.add_argument(
        "--epochs",
        metavar="N",
        type=int,
        default=defaults.epochs,
        help=f"(default {defaults.epochs})",
    )
    train.add_argument(
        "--dataset",
        metavar="NAME",
        default="mnist",
        help="mnist, synthetic, or a file in the server's data dir (default mnist)",
    )
    train.add_argument(
        "--strategy",
        choices=SERVICE_STRATEGIES,
        default="auto",
        help="distribution strategy (default auto)",
    )
    train.add_argument(
        "--devices",
        metavar="N",
        type=int,
        default=0,
        help="GPUs the job asks for (default 0: the strategy's default)",
    )
    train.add_argument(
        "--steps-per-execution",
        metavar="N",
        type=int,
        default=defaults.steps_per_execution,
        help="steps per compiled call (default 0: a whole epoch)",
    )
    train.add_argument("--jit", action="store_true", help="compile with XLA")
    train.add_argument("--seed", metavar="N", type=int, default=defaults.seed, help="(default 0)")
    train.add_argument(
        "--checkpoint-every",
        metavar="N",
        type=int,
        default=0,
        help="epochs between checkpoints (default 0: at the end only)",
    )
    train.add_argument(
        "--max-runtime",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="seconds before the job fails (default 0: no limit)",
    )
    train.add_argument(
        "--request-id",
        metavar="ID",
        default=None,
        help="idempotency key: resubmitting it returns the same job",
    )
    train.add_argument("--detach", action="store_true", help="print the job id and return")
    train.set_defaults(run=cmd_train)

    jobs = commands.add_parser("jobs", parents=[client, as_json], help="list jobs, newest first")
    jobs.add_argument(
        "--state",
        action="append",
        type=str.upper,
        choices=JOB_STATE_NAMES,
        help="only jobs in this state (repeatable)",
    )
    jobs.add_argument(
        "--limit", metavar="N", type=_positive_int, default=20, help="at most N jobs (default 20)"
    )
    jobs.set_defaults(run=cmd_jobs)

    watch = commands.add_parser("watch", parents=[client], help="follow a job until it ends")
    watch.add_argument("job_id", metavar="JOB")
    watch.set_defaults(run=cmd_watch)

    cancel = commands.add_parser("cancel", parents=[client], help="cancel a queued or running job")
    cancel.add_argument("job_id", metavar="JOB")
    cancel.set_defaults(run=cmd_cancel)

    evaluate = commands.add_parser(
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
    evaluate.set_defaults(run=cmd_eval, default_timeout=MODEL_TIMEOUT)

    prediction = commands.add_parser(
        "predict", parents=[client, as_json], help="classify inputs with a job's model"
    )
    prediction.add_argument("job_id", metavar="JOB")
    source = prediction.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", metavar="PATH", help=".npy or .npz of inputs (an .npz may carry labels)"
    )
    source.add_argument(
        "--mnist-test", type=_positive_int, metavar="N", help="the first N MNIST test images"
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
        type=_positive_int,
        default=None,
        help="only the first N inputs of --input",
    )
    prediction.add_argument(
        "--show", action="store_true", help="draw each input as ASCII art beside its prediction"
    )
    prediction.set_defaults(run=cmd_predict, default_timeout=MODEL_TIMEOUT)

    info = commands.add_parser("info", parents=[client, as_json], help="server version and devices")
    info.set_defaults(run=cmd_info)

    health = commands.add_parser(
        "health", parents=[client], help="exit 0 when the server reports SERVING, else 1"
    )
    health.add_argument(
        "--service", metavar="NAME", default="", help="service name to check (default: the server)"
    )
    health.set_defaults(run=cmd_health, default_timeout=5.0)
    return parser


# --- entry point ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ntrain command; returns the exit status."""
    args = build_parser().parse_args(argv)
    address = getattr(args, "address", None)
    if address is not None and args.timeout is None:
        args.timeout = getattr(args, "default_timeout", QUICK_TIMEOUT)
    try:
        if address is None:
            return args.run(args)
        with open_channel(address) as args.channel:
            return args.run(args)
    except CliError as error:
        return _fail(str(error), error.exit_code)
    except grpc.RpcError as error:
        return _fail(describe_rpc_error(error, address or "", args.timeout))
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`ntrain jobs | head`): not an error worth a line.
        sys.stderr.close()
        return EXIT_OK
    except Exception as error:
        if os.environ.get(DEBUG_ENV):
            raise
        return _fail(
            f"unexpected error: {type(error).__name__}: {error} (set {DEBUG_ENV}=1 for a traceback)"
        )


def _fail(message: str, exit_code: int = EXIT_ERROR) -> int:
    print(f"ntrain: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
