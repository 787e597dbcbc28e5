"""The experiments' block of the contract to the protocol's dataclasses and back.

The same work as `service.api.convert` (whose JobSpec conversion it reuses)
for the messages of the contract's experiments block, field by field.
"""

from __future__ import annotations

from typing import cast

from ntrain.v1 import training_pb2 as pb

from service.api.convert import fields_under, job_spec_from_proto, job_spec_to_proto, timestamp
from service.jobs.errors import InvalidArgument
from service.jobs.experiment_spec import (
    MAX_PARAMETERS,
    CategoricalParameter,
    ExperimentSpec,
    FloatParameter,
    IntParameter,
    Parameter,
)
from service.jobs.experiments import ExperimentRecord, ExperimentState, TrialRecord, TrialState
from service.protocol import PRIORITY_CLASSES

DEFAULT_MAX_TRIALS = 16
DEFAULT_MAX_FAILED_TRIALS = 3
DEFAULT_REDUCTION_FACTOR = 3


def experiment_spec_from_proto(message: pb.ExperimentSpec) -> ExperimentSpec:
    """Convert an ExperimentSpec message; unset fields take the documented defaults."""
    if len(message.parameters) > MAX_PARAMETERS:
        raise InvalidArgument(
            f"parameters must hold at most {MAX_PARAMETERS}, got {len(message.parameters)}",
            field="parameters",
        )
    if not message.base.dataset:
        raise InvalidArgument("base.dataset is required", field="base.dataset")
    with fields_under("base"):
        base = job_spec_from_proto(message.base)
    stopping = message.early_stopping
    return ExperimentSpec(
        base=base,
        parameters=tuple(
            _parameter_from_proto(index, parameter)
            for index, parameter in enumerate(message.parameters)
        ),
        metric=message.metric or "eval_accuracy",
        direction=message.direction,
        searcher=message.searcher or "tpe",
        early_stopping=stopping.kind or "none",
        min_epochs=stopping.min_epochs or 1,
        reduction_factor=stopping.reduction_factor or DEFAULT_REDUCTION_FACTOR,
        max_trials=message.max_trials or DEFAULT_MAX_TRIALS,
        max_concurrent_trials=message.max_concurrent_trials or 1,
        max_failed_trials=(
            message.max_failed_trials
            if message.HasField("max_failed_trials")
            else DEFAULT_MAX_FAILED_TRIALS
        ),
        target=message.target if message.HasField("target") else None,
        seed=message.seed,
        name=message.name,
        trial_priority=(
            message.trial_priority
            if message.HasField("trial_priority")
            else PRIORITY_CLASSES["low"]
        ),
    )


def _parameter_from_proto(index: int, message: pb.SearchParameter) -> Parameter:
    kind = message.WhichOneof("range")
    if kind == "int_range":
        r = message.int_range
        return IntParameter(name=message.name, low=r.low, high=r.high, step=r.step or 1, log=r.log)
    if kind == "float_range":
        f = message.float_range
        return FloatParameter(
            name=message.name, low=f.low, high=f.high, log=f.log, grid_points=f.grid_points
        )
    if kind == "categorical":
        return CategoricalParameter(name=message.name, values=tuple(message.categorical.values))
    raise InvalidArgument(
        f"parameters[{index}] needs one of int_range, float_range or categorical",
        field=f"parameters[{index}]",
    )


def experiment_spec_to_proto(spec: ExperimentSpec) -> pb.ExperimentSpec:
    message = pb.ExperimentSpec(
        base=job_spec_to_proto(spec.base),
        parameters=[_parameter_to_proto(parameter) for parameter in spec.parameters],
        metric=spec.metric,
        direction=spec.direction or ("maximize" if spec.maximize else "minimize"),
        searcher=spec.searcher,
        early_stopping=pb.EarlyStopping(
            kind=spec.early_stopping,
            min_epochs=spec.min_epochs,
            reduction_factor=spec.reduction_factor,
        ),
        max_trials=spec.max_trials,
        max_concurrent_trials=spec.max_concurrent_trials,
        max_failed_trials=spec.max_failed_trials,
        seed=spec.seed,
        name=spec.name,
        trial_priority=spec.trial_priority,
    )
    if spec.target is not None:
        message.target = spec.target
    return message


def _parameter_to_proto(parameter: Parameter) -> pb.SearchParameter:
    if isinstance(parameter, IntParameter):
        return pb.SearchParameter(
            name=parameter.name,
            int_range=pb.IntRange(
                low=parameter.low, high=parameter.high, step=parameter.step, log=parameter.log
            ),
        )
    if isinstance(parameter, FloatParameter):
        return pb.SearchParameter(
            name=parameter.name,
            float_range=pb.FloatRange(
                low=parameter.low,
                high=parameter.high,
                log=parameter.log,
                grid_points=parameter.grid_points,
            ),
        )
    return pb.SearchParameter(
        name=parameter.name, categorical=pb.CategoricalValues(values=list(parameter.values))
    )


def experiment_state_to_proto(state: ExperimentState) -> pb.ExperimentState:
    return cast(pb.ExperimentState, pb.ExperimentState.Value(f"EXPERIMENT_STATE_{state.name}"))


def trial_state_to_proto(state: TrialState) -> pb.TrialState:
    return cast(pb.TrialState, pb.TrialState.Value(f"TRIAL_STATE_{state.name}"))


def trial_to_proto(trial: TrialRecord) -> pb.Trial:
    message = pb.Trial(
        number=trial.number,
        params={name: _text(value) for name, value in trial.params},
        job_id=trial.job_id,
        state=trial_state_to_proto(trial.state),
        epochs=trial.epochs,
        stopped_early_at=trial.stopped_early_at,
        reason=trial.reason,
    )
    if trial.metric is not None:
        message.metric = trial.metric
    return message


def _text(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def experiment_to_proto(record: ExperimentRecord) -> pb.Experiment:
    message = pb.Experiment(
        experiment_id=record.experiment_id,
        request_id=record.request_id,
        spec=experiment_spec_to_proto(record.spec),
        state=experiment_state_to_proto(record.state),
        reason=record.reason,
        create_time=timestamp(record.create_time),
        owner=record.owner,
        trials=[trial_to_proto(trial) for trial in record.trials],
    )
    if record.end_time is not None:
        message.end_time.CopyFrom(timestamp(record.end_time))
    if record.best_trial is not None:
        message.best_trial = record.best_trial
    return message
