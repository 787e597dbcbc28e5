"""The ntrain commands: each parses nothing and prints what the client returns.

Every command takes the parsed arguments (`args.channel` is open for client
commands) and returns the exit status; failures raise `CliError` or let a
`grpc.RpcError` through, which `service.cli.main` turns into one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import uuid
from pathlib import Path

from ntrain.v1 import training_pb2, training_pb2_grpc

from service.cli import output as cli_output
from service.cli.client import QUICK_TIMEOUT, predict, watch_events
from service.cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, CliError
from service.cli.inputs import format_layers, load_inputs, load_mnist_test
from service.cli.progress import ProgressRenderer


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
        precision=args.precision,
        checkpoint_every_epochs=args.checkpoint_every,  # None leaves it to the server
        max_runtime_seconds=args.max_runtime,
        max_restarts=args.max_restarts,
    )


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
    states = [training_pb2.JobState.Name(training_pb2.JobState.Value(s)) for s in args.state or ()]
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


def cmd_predict(args) -> int:
    labels: list[int] | None
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
    from service.api.server import ServerConfig, serve

    # Only what was given on the command line; ServerConfig holds the defaults.
    options = {
        "bind_address": args.bind,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "state_dir": Path(args.state_dir) if args.state_dir else None,
        "data_dir": Path(args.data_dir) if args.data_dir else None,
        "max_queue": args.max_queue,
        "max_cpu_jobs": args.max_cpu_jobs,
        "jobs_per_gpu": args.jobs_per_gpu,
        "backfill_seconds": args.backfill_seconds,
        "auto_gpu_wait_seconds": args.auto_gpu_wait,
        "warm_worker": False if args.no_warm_worker else None,
        "job_series_retention_seconds": args.job_series_retention,
        "checkpoint_seconds": args.checkpoint_seconds,
        "max_streams": args.max_streams,
        "shutdown_grace_seconds": args.shutdown_grace,
    }
    config = ServerConfig(**{key: value for key, value in options.items() if value is not None})
    if args.no_metrics:
        config = dataclasses.replace(config, metrics_port=None)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def on_ready(server) -> None:
        metrics = (
            f", metrics on http://{config.bind_address}:{server.metrics_port}/metrics"
            if server.metrics_port
            else ""
        )
        print(
            f"ntrain {version()} ready: gRPC on {config.bind_address}:{server.port}{metrics}, "
            f"state in {config.state_dir}",
            file=sys.stderr,
            flush=True,
        )
        if args.port_file:
            _write_atomically(Path(args.port_file), f"{server.port}\n")

    def on_stopping() -> None:
        print("ntrain: shutting down", file=sys.stderr, flush=True)

    try:
        serve(config, on_ready=on_ready, on_stopping=on_stopping)
    except Exception as error:
        metrics = (
            "no metrics" if config.metrics_port is None else f"metrics port {config.metrics_port}"
        )
        raise CliError(
            f"cannot start the server (gRPC {config.bind_address}:{config.port}, {metrics}): "
            f"{error}"
        ) from None
    return EXIT_OK


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
