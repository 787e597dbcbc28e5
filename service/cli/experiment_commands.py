"""The experiment commands (`sweep`, `experiments`; `describe`, `model` and `cancel` of
an `exp-` id) and the text they print.

As the job commands: each takes the parsed arguments, prints what the client
returns, and returns the exit status.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from ntrain.v1 import training_pb2

from ntrain.client import experiment_spec
from service.cli import output as cli_output
from service.cli.exit_status import EXIT_INTERRUPTED, EXIT_OK, CliError

EXPERIMENT_PREFIX = "exp-"


def is_experiment_id(name: str) -> bool:
    return name.startswith(EXPERIMENT_PREFIX)


def experiment_state_name(value: int) -> str:
    return training_pb2.ExperimentState.Name(value).removeprefix("EXPERIMENT_STATE_")


def trial_state_name(value: int) -> str:
    return training_pb2.TrialState.Name(value).removeprefix("TRIAL_STATE_")


def cmd_sweep(args) -> int:
    spec = experiment_spec(args.file)
    if args.name:
        spec.name = args.name
    experiment = args.client.submit_experiment(spec)
    print(
        f"experiment {experiment.experiment_id}: {experiment.spec.searcher} search, "
        f"{cli_output.plural(experiment.spec.max_trials, 'trial')}"
    )
    if args.detach:
        return EXIT_OK
    return follow_experiment(args.client, experiment.experiment_id)


def follow_experiment(client, experiment_id: str) -> int:
    """Print a line as each trial changes state, then the table; 0 if it SUCCEEDED."""
    seen: dict[int, int] = {}
    try:
        states = client.watch_experiment(
            experiment_id,
            on_reconnect=lambda: print(
                f"ntrain: connection lost; reconnecting to experiment {experiment_id}",
                file=sys.stderr,
                flush=True,
            ),
        )
        for experiment in states:
            for trial in experiment.trials:
                if seen.get(trial.number) != trial.state:
                    seen[trial.number] = trial.state
                    print(f"trial {trial.number}: {_trial_line(trial, experiment.spec.metric)}")
    except KeyboardInterrupt:
        raise CliError(
            f"stopped following experiment {experiment_id}; it goes on running "
            f"(ntrain describe {experiment_id}, ntrain cancel {experiment_id})",
            EXIT_INTERRUPTED,
        ) from None
    experiment = client.get_experiment(experiment_id)
    print(describe_experiment(experiment))
    if experiment.state != training_pb2.EXPERIMENT_STATE_SUCCEEDED:
        raise CliError(
            f"experiment {experiment_id} ended {experiment_state_name(experiment.state)}: "
            f"{experiment.reason}"
        )
    return EXIT_OK


def _trial_line(trial: training_pb2.Trial, metric: str) -> str:
    params = ", ".join(f"{name}={value}" for name, value in sorted(trial.params.items()))
    line = f"{trial_state_name(trial.state)} {params}"
    if trial.HasField("metric"):
        line += (
            f"; {metric} {_metric(metric, trial.metric)} "
            f"after {cli_output.plural(trial.epochs, 'epoch')}"
        )
    if trial.stopped_early_at:
        line += f" (stopped early at epoch {trial.stopped_early_at})"
    return line


def cmd_experiments(args) -> int:
    experiments = args.client.list_experiments(limit=args.limit)
    if args.json:
        print(cli_output.to_json(experiments))
    elif experiments:
        print(experiments_table(experiments))
    else:
        print("no experiments")
    return EXIT_OK


def cmd_describe_experiment(args) -> int:
    experiment = args.client.get_experiment(args.job_id)
    print(cli_output.to_json(experiment) if args.json else describe_experiment(experiment))
    return EXIT_OK


def cmd_model_of_experiment(args) -> int:
    trial = args.client.best_trial(args.job_id)
    try:
        folder = args.client.download_model(trial.job_id, args.output, version=args.version)
    except OSError as error:
        raise CliError(f"cannot write the model: {error}") from None
    print(
        f"experiment {args.job_id}: trial {trial.number}'s model (job {trial.job_id}) in "
        f"{folder}; serve it with --model_base_path={folder.parent.resolve()}"
    )
    return EXIT_OK


def cmd_cancel_experiment(args) -> int:
    experiment = args.client.cancel_experiment(args.job_id)
    running = sum(
        1 for trial in experiment.trials if trial.state <= training_pb2.TRIAL_STATE_RUNNING
    )
    print(
        f"experiment {experiment.experiment_id}: {experiment_state_name(experiment.state)}; "
        f"{cli_output.plural(running, 'trial')} being canceled"
    )
    return EXIT_OK


# -- text ------------------------------------------------------------------------------


def experiments_table(experiments: Sequence[training_pb2.Experiment]) -> str:
    headers = ("EXPERIMENT", "STATE", "CREATED", "SEARCHER", "TRIALS", "BEST", "NAME")
    rows = []
    for experiment in experiments:
        best = "-"
        if experiment.HasField("best_trial"):
            trial = experiment.trials[experiment.best_trial]
            best = f"{_metric(experiment.spec.metric, trial.metric)} (trial {trial.number})"
        stopping = experiment.spec.early_stopping.kind
        searcher = experiment.spec.searcher + ("+sha" if stopping == "successive_halving" else "")
        rows.append(
            (
                experiment.experiment_id,
                experiment_state_name(experiment.state),
                cli_output.format_time(experiment.create_time),
                searcher,
                f"{len(experiment.trials)}/{experiment.spec.max_trials}",
                best,
                experiment.spec.name or "-",
            )
        )
    return cli_output.format_table(headers, rows)


def describe_experiment(experiment: training_pb2.Experiment) -> str:
    """The experiment, then its trials as a table sorted by the metric, best first."""
    spec = experiment.spec
    stopping = spec.early_stopping
    lines = [
        f"experiment  {experiment.experiment_id}" + (f" ({spec.name})" if spec.name else ""),
        f"state       {experiment_state_name(experiment.state)}"
        + (f": {experiment.reason}" if experiment.reason else ""),
        f"created     {cli_output.format_time(experiment.create_time)}",
        f"searcher    {spec.searcher}, seed {spec.seed}; {spec.direction} {spec.metric}"
        + (f", target {spec.target:g}" if spec.HasField("target") else ""),
        "stopping    "
        + (
            f"successive halving from {cli_output.plural(stopping.min_epochs, 'epoch')}, "
            f"reduction factor {stopping.reduction_factor}"
            if stopping.kind == "successive_halving"
            else "none"
        ),
        f"trials      {len(experiment.trials)} of at most {spec.max_trials}, "
        f"{spec.max_concurrent_trials} at a time, {spec.max_failed_trials} may fail",
        f"base job    {spec.base.dataset}, layers {cli_output.describe_layers(spec.base)}, "
        f"{cli_output.plural(spec.base.epochs, 'epoch')}",
    ]
    if experiment.HasField("best_trial"):
        best = experiment.trials[experiment.best_trial]
        lines.append(
            f"best        trial {best.number} (job {best.job_id}): "
            f"{spec.metric} {_metric(spec.metric, best.metric)}"
        )
    if experiment.trials:
        lines += ["", trials_table(experiment)]
    return "\n".join(lines)


def trials_table(experiment: training_pb2.Experiment) -> str:
    """One row a trial, best metric first; trials without a metric last, by number."""
    spec = experiment.spec
    names = [parameter.name for parameter in spec.parameters]
    sign = -1.0 if spec.direction == "maximize" else 1.0

    def order(trial: training_pb2.Trial) -> tuple[bool, float, int]:
        if not trial.HasField("metric") or math.isnan(trial.metric):
            return (True, 0.0, trial.number)
        return (False, sign * trial.metric, trial.number)

    headers = ("TRIAL", *[name.upper() for name in names], "EPOCHS", "STATE", spec.metric.upper(),
               "STOPPED EARLY", "JOB")  # fmt: skip
    rows = [
        (
            trial.number,
            *[trial.params.get(name, "-") for name in names],
            trial.epochs,
            trial_state_name(trial.state),
            _metric(spec.metric, trial.metric) if trial.HasField("metric") else "-",
            f"at epoch {trial.stopped_early_at}" if trial.stopped_early_at else "no",
            trial.job_id or "-",
        )
        for trial in sorted(experiment.trials, key=order)
    ]
    return cli_output.format_table(headers, rows)


def _metric(metric: str, value: float) -> str:
    return cli_output.format_percent(value) if metric == "eval_accuracy" else f"{value:.4f}"
