"""The ntrain commands: each parses nothing and prints what the client returns.

Every command takes the parsed arguments (`args.client`, an
`ntrain.client.Client`, is open for client commands) and returns the exit
status; failures raise `CliError` or let an `ntrain.client.NtrainError`
through, which `service.cli.app` turns into one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

from ntrain.v1 import training_pb2

from naive_model.data import to_features
from ntrain.client import Client, FailedPrecondition, job_spec
from service.cli import experiment_commands
from service.cli import output as cli_output
from service.cli.describe import describe_job
from service.cli.exit_status import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError
from service.cli.inputs import format_layers, load_inputs, load_mnist_test
from service.cli.progress import ProgressRenderer


def build_job_spec(args: argparse.Namespace) -> training_pb2.JobSpec:
    """The JobSpec of `train`: the job file's (-f), with the flags given set over it.

    A flag not given is not sent, so the file's value or else the server's
    default holds (the book's network and training: see `ntrain train --help`).
    Without a data set in either, the job trains on MNIST. Labels from flags
    are added to the file's, replacing those with the same key.
    """
    spec = job_spec(args.file) if args.file else training_pb2.JobSpec()
    if args.layers is not None:
        del spec.layers[:]
        spec.layers.extend(args.layers)
    optimizer, strategy = spec.optimizer, spec.strategy
    for message, field, value in (
        (spec, "name", args.name),
        (spec, "initializer", args.init),
        (optimizer, "name", args.optimizer),
        (optimizer, "learning_rate", args.lr),
        (optimizer, "momentum", args.momentum),
        (spec, "batch_size", args.batch_size),
        (spec, "epochs", args.epochs),
        (spec, "dataset", args.dataset),
        (strategy, "name", args.strategy),
        (strategy, "device_count", args.devices),
        (spec, "steps_per_execution", args.steps_per_execution),
        (spec, "jit_compile", args.jit),
        (spec, "seed", args.seed),
        (spec, "precision", args.precision),
        (spec, "data_mode", args.data_mode),
        (spec, "checkpoint_every_epochs", args.checkpoint_every),
        (spec, "max_runtime_seconds", args.max_runtime),
        (spec, "max_restarts", args.max_restarts),
        (spec, "priority", args.priority),
    ):
        if value is not None:
            setattr(message, field, value)
    spec.labels.update(dict(args.label or ()))
    if not spec.dataset:
        spec.dataset = "mnist"
    return spec


def follow_job(
    client: Client, job: training_pb2.Job, renderer: ProgressRenderer
) -> training_pb2.Job:
    """Show a job's events until it ends; return the job as it ended."""
    epochs = job.spec.epochs
    try:
        events = client.watch(
            job.job_id,
            on_reconnect=lambda last: print(
                f"ntrain: connection lost; reconnecting from event {last}",
                file=sys.stderr,
                flush=True,
            ),
        )
        for event in events:
            payload = event.payload
            if isinstance(payload, training_pb2.StateTransition):
                renderer.line(cli_output.format_state_change(payload))
            elif isinstance(payload, training_pb2.Progress):
                epochs = payload.epochs or epochs
                renderer.progress(payload)
            elif isinstance(payload, training_pb2.EpochSummary):
                renderer.epoch_end(payload, epochs)
            elif isinstance(payload, training_pb2.JobResult):
                renderer.close()
                renderer.line("result: " + cli_output.format_result(payload))
    finally:
        renderer.close()
    return client.get(job.job_id)


def job_exit_status(job: training_pb2.Job) -> int:
    """0 for SUCCEEDED; otherwise say why on standard error and return 1."""
    if job.state == training_pb2.JOB_STATE_SUCCEEDED:
        return EXIT_OK
    state = cli_output.state_name(job.state)
    # A reason may be a whole TensorFlow error; its last line says what went wrong.
    lines = [line.strip() for line in job.failure_reason.splitlines() if line.strip()]
    reason = f": {lines[-1]}" if lines else ""
    raise CliError(f"job {job.job_id} ended {state}{reason}")


def _follow_or_explain(job, args) -> int:
    renderer = ProgressRenderer(sys.stdout)
    try:
        ended = follow_job(args.client, job, renderer)
    except KeyboardInterrupt:
        raise CliError(
            f"stopped following job {job.job_id}; it goes on running "
            f"(ntrain watch {job.job_id}, ntrain cancel {job.job_id})",
            EXIT_INTERRUPTED,
        ) from None
    return job_exit_status(ended)


def cmd_train(args) -> int:
    job = args.client.submit(build_job_spec(args), request_id=args.request_id)
    if args.detach:
        print(job.job_id)
        return EXIT_OK
    print(
        f"job {job.job_id} submitted: {format_layers(job.spec.layers)} on {job.spec.dataset}, "
        f"{cli_output.plural(job.spec.epochs, 'epoch')}, batch {job.spec.batch_size}, "
        f"{job.spec.optimizer.name} lr {job.spec.optimizer.learning_rate:g}",
        flush=True,
    )
    return _follow_or_explain(job, args)


def cmd_watch(args) -> int:
    return _follow_or_explain(args.client.get(args.job_id), args)


def cmd_jobs(args) -> int:
    jobs = args.client.list(
        states=args.state or (), labels=dict(args.label or ()), limit=args.limit
    )
    return _print_listing(args, jobs, cli_output.jobs_table, "no jobs")


def _print_listing(args, items: list, table: Callable[[list], str], nothing: str) -> int:
    """A list of messages as JSON (--json), as a table, or a line saying there are none."""
    if args.json:
        print(cli_output.to_json(items))
    else:
        print(table(items) if items else nothing)
    return EXIT_OK


def cmd_describe(args) -> int:
    if experiment_commands.is_experiment_id(args.job_id):
        return experiment_commands.cmd_describe_experiment(args)
    job = args.client.get(args.job_id)
    print(cli_output.to_json(job) if args.json else describe_job(job))
    return EXIT_OK


def cmd_logs(args) -> int:
    lines = args.client.logs(
        args.job_id,
        follow=args.follow,
        on_reconnect=lambda offset: print(
            f"ntrain logs: connection lost; reconnecting at byte {offset}",
            file=sys.stderr,
            flush=True,
        ),
    )
    for line in lines:
        print(line, flush=args.follow)
    return EXIT_OK


def cmd_model(args) -> int:
    if experiment_commands.is_experiment_id(args.job_id):
        return experiment_commands.cmd_model_of_experiment(args)
    try:
        folder = args.client.download_model(args.job_id, args.output, version=args.version)
    except OSError as error:
        raise CliError(f"cannot write the model: {error}") from None
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    size = sum(path.stat().st_size for path in files)
    print(
        f"job {args.job_id}: SavedModel in {folder} ({cli_output.plural(len(files), 'file')}, "
        f"{cli_output.format_bytes(size)}); serve it with "
        f"--model_base_path={folder.parent.resolve()}"
    )
    return EXIT_OK


def cmd_data_push(args) -> int:
    try:
        pushed = args.client.push_dataset(
            args.files if len(args.files) > 1 else args.files[0],
            name=args.name,
            label_column=args.label_column,
            test_fraction=args.test_fraction,
            num_classes=args.num_classes,
            format=args.format,
        )
    except OSError as error:
        raise CliError(f"cannot read the file: {error}") from None
    except ValueError as error:
        raise CliError(str(error)) from None
    print(cli_output.to_json(pushed) if args.json else cli_output.describe_dataset(pushed))
    return EXIT_OK


def cmd_data_ls(args) -> int:
    datasets = args.client.datasets(args.name)
    return _print_listing(args, datasets, cli_output.datasets_table, "no data sets")


def cmd_data_describe(args) -> int:
    dataset = args.client.dataset(args.dataset)
    print(cli_output.to_json(dataset) if args.json else cli_output.describe_dataset(dataset))
    return EXIT_OK


def cmd_data_rm(args) -> int:
    deleted = args.client.delete_dataset(args.dataset)
    if args.json:
        print(cli_output.to_json(deleted))
    for dataset in [] if args.json else deleted:
        print(f"deleted {dataset.name}@{dataset.digest}")
    return EXIT_OK


def cmd_completion(args, parser: argparse.ArgumentParser) -> int:
    try:
        import shtab
    except ImportError:
        raise CliError(
            "shell completion needs shtab: pip install 'ntrain[completion]' (or shtab)"
        ) from None
    print(shtab.complete(parser, shell=args.shell))
    return EXIT_OK


def cmd_cancel(args) -> int:
    if experiment_commands.is_experiment_id(args.job_id):
        return experiment_commands.cmd_cancel_experiment(args)
    job = args.client.cancel(args.job_id)
    print(f"job {job.job_id}: {cli_output.state_name(job.state)}")
    return EXIT_OK


def cmd_eval(args) -> int:
    try:
        response = args.client.evaluate(
            args.job_id, dataset=args.dataset, checkpoint=args.checkpoint
        )
    except FailedPrecondition as error:
        if args.checkpoint:
            raise
        # No model (the job failed, was canceled or still runs): its checkpoint may do.
        raise CliError(
            f"{error}; ntrain eval {args.job_id} --checkpoint evaluates its latest checkpoint"
        ) from None
    if args.json:
        print(cli_output.to_json(response))
    else:
        print(cli_output.format_evaluation(args.job_id, response))
    return EXIT_OK


def cmd_predict(args) -> int:
    labels: list[int] | None
    if args.mnist_test is not None:
        inputs, labels = load_mnist_test(args.mnist_test, args.mnist_file)
    else:
        inputs, labels = load_inputs(args.input)
        if args.limit is not None:
            inputs = inputs[: args.limit]
            labels = labels[: args.limit] if labels is not None else None
    if not len(inputs):
        raise CliError("no inputs to predict")
    # (examples, features), uint8 pixels as they are: the server scales them.
    probabilities = args.client.predict(args.job_id, inputs)
    predictions = [
        training_pb2.Prediction(label=int(row.argmax()), probabilities=row.tolist())
        for row in probabilities
    ]
    if args.json:
        print(cli_output.to_json(training_pb2.PredictResponse(predictions=predictions)))
        return EXIT_OK
    if args.show:
        pixels = to_features(inputs)  # in [0, 1], as the model saw them
        for index, prediction in enumerate(predictions):
            art = cli_output.ascii_image(pixels[index])
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
    info = args.client.info()
    print(cli_output.to_json(info) if args.json else cli_output.format_server_info(info))
    return EXIT_OK


def cmd_health(args) -> int:
    status = args.client.health(args.service)
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_ERROR


def cmd_token_new(args) -> int:
    from service.api.auth import TokenTable, is_valid_name, new_token, token_hash

    if not is_valid_name(args.name):
        raise CliError("a name is letters, digits and ._@- (64 at most)", EXIT_USAGE)
    path = Path(args.auth_tokens)
    try:
        # The file must be valid before it grows, and a name is listed once.
        if path.exists() and args.name in TokenTable.load(path).names:
            raise CliError(f"{args.name} is already in {path}; remove its line to replace it")
        token = new_token()
        # 0600 when new: the hashes are not the tokens, but nobody else needs them.
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "a") as tokens:
            line = f"{args.name} {args.role} {token_hash(token)}"
            if args.max_priority is not None:
                line += f" max-priority={args.max_priority}"
            tokens.write(line + "\n")
    except (OSError, ValueError) as error:
        raise CliError(f"cannot add {args.name} to {path}: {error}") from None
    print(token)
    return EXIT_OK


def cmd_token_hash(args) -> int:
    from service.api.auth import hash_secret

    secret = sys.stdin.readline().strip()
    if not secret:
        raise CliError("no password on standard input", EXIT_USAGE)
    print(hash_secret(secret))
    return EXIT_OK


# What `ntrain serve` needs beyond the client: `pip install 'ntrain[server]'`.
SERVER_MODULES = ("tensorflow", "prometheus_client", "grpc_reflection")


def missing_server_modules() -> list[str]:
    """The server extra's modules that are not installed (found, not imported: TF is slow)."""
    return [name for name in SERVER_MODULES if find_spec(name) is None]


def cmd_serve(args) -> int:
    missing = missing_server_modules()
    if missing:
        raise CliError(
            f"ntrain serve needs the server extra ({', '.join(missing)} not installed): "
            "pip install 'ntrain[server]' (or 'ntrain[gpu]' for CUDA)"
        )
    if args.mlflow_tracking_uri and find_spec("mlflow") is None:
        raise CliError(
            "--mlflow-tracking-uri needs the MLflow client (the mlflow extra): "
            "pip install 'ntrain[mlflow]'"
        )
    from service.api.server import ServerConfig, exposure_problem, serve

    tls = _tls_files("--tls", args.tls_cert, args.tls_key, args.tls_client_ca)
    metrics_tls = _tls_files(
        "--metrics-tls", args.metrics_tls_cert, args.metrics_tls_key, args.metrics_tls_client_ca
    )
    # Only what was given on the command line; ServerConfig holds the defaults.
    options = {
        "bind_address": args.bind,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "state_dir": Path(args.state_dir) if args.state_dir else None,
        "data_dir": Path(args.data_dir) if args.data_dir else None,
        "max_dataset_bytes": args.max_dataset_bytes,
        "data_budget_bytes": args.data_budget_bytes,
        "max_queue": args.max_queue,
        "max_queue_per_principal": args.max_queue_per_principal,
        "max_cpu_jobs": args.max_cpu_jobs,
        "max_model_tasks": args.max_model_tasks,
        "model_cache": args.model_cache,
        "jobs_per_gpu": args.jobs_per_gpu,
        "backfill_seconds": args.backfill_seconds,
        "auto_gpu_wait_seconds": args.auto_gpu_wait,
        "preemption_grace_seconds": args.preemption_grace,
        "min_run_seconds": args.min_run,
        "hang_seconds": args.hang_seconds,
        "progress_interval_seconds": args.progress_interval,
        "warm_worker": False if args.no_warm_worker else None,
        "job_series_retention_seconds": args.job_series_retention,
        "checkpoint_seconds": args.checkpoint_seconds,
        "max_streams": args.max_streams,
        "max_streams_per_principal": args.max_streams_per_principal,
        "stream_send_timeout_seconds": args.stream_send_timeout,
        "stream_max_age_seconds": args.stream_max_age,
        "shutdown_grace_seconds": args.shutdown_grace,
        "tls": tls,
        "auth_tokens": Path(args.auth_tokens) if args.auth_tokens else None,
        "reflection": False if args.no_reflection else None,
        "metrics_tls": metrics_tls,
        "metrics_basic_auth": Path(args.metrics_basic_auth) if args.metrics_basic_auth else None,
        "insecure": args.insecure or None,
        "ray_address": args.ray_address,
        "ray_token_file": Path(args.ray_token_file) if args.ray_token_file else None,
        "mlflow_tracking_uri": args.mlflow_tracking_uri,
    }
    config = ServerConfig(**{key: value for key, value in options.items() if value is not None})
    if args.no_metrics:
        config = dataclasses.replace(config, metrics_port=None)
    problem = exposure_problem(config)
    if problem is not None:
        raise CliError(problem, EXIT_USAGE)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def on_ready(server) -> None:
        scheme = "http" if config.metrics_tls is None else "https"
        metrics = (
            f", metrics on {scheme}://{config.bind_address}:{server.metrics_port}/metrics"
            if server.metrics_port
            else ""
        )
        if args.port_file:  # before "ready": a reader of the file may rely on both
            _write_atomically(Path(args.port_file), f"{server.port}\n")
        print(
            f"ntrain {version()} ready: gRPC on {config.bind_address}:{server.port}{metrics}, "
            f"state in {config.state_dir}",
            file=sys.stderr,
            flush=True,
        )

    def on_stopping(why: str) -> None:
        print(f"ntrain: shutting down: {why}", file=sys.stderr, flush=True)

    if args.port_file:
        _check_port_file_folder(Path(args.port_file))

    try:
        serve(
            config,
            on_ready=on_ready,
            on_stopping=on_stopping,
            parent_pid=os.getppid() if args.exit_with_parent else None,
        )
    except Exception as error:
        metrics = (
            "no metrics" if config.metrics_port is None else f"metrics port {config.metrics_port}"
        )
        raise CliError(
            f"cannot start the server (gRPC {config.bind_address}:{config.port}, {metrics}): "
            f"{error}"
        ) from None
    return EXIT_OK


def _tls_files(flag: str, cert: str | None, key: str | None, client_ca: str | None):
    from service.api.tls import TlsFiles

    if cert is None and key is None:
        if client_ca is not None:
            raise CliError(f"{flag}-client-ca needs {flag}-cert and {flag}-key", EXIT_USAGE)
        return None
    if cert is None or key is None:
        raise CliError(f"{flag}-cert and {flag}-key go together", EXIT_USAGE)
    return TlsFiles(
        cert=Path(cert), key=Path(key), client_ca=Path(client_ca) if client_ca else None
    )


def _check_port_file_folder(path: Path) -> None:
    """The folder of --port-file must take the file: checked before the server starts."""
    folder = path.parent
    if not folder.is_dir():
        problem = "is not a directory" if folder.exists() else "does not exist"
        raise CliError(f"cannot write the port file {path}: the folder {folder} {problem}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"cannot write the port file {path}: the folder {folder} is not writable")


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the whole file or none of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def version() -> str:
    try:
        from importlib.metadata import version

        return version("ntrain")
    except Exception:  # not installed as a distribution
        return "(unknown version)"
