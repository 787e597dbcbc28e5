"""What an experiment is: a base job, a search space over its fields, a metric, a budget.

Plain frozen dataclasses, checked here (each invalid value raises
`InvalidArgument` naming the field), stored as JSON, and applied to the base
`JobSpec` to make one trial's spec. No Optuna here: `service.jobs.experiments`
turns a space into Optuna's suggestions.

A parameter names a field of the job as the rest of the service does:
`learning_rate`, `momentum`, `optimizer`, `batch_size`, `epochs`, `precision`,
`initializer`, and `layers[i].units` or `layers[i].activation` for a hidden
layer (the last layer's units are the data set's classes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from naive_model.config import shown
from service.jobs.errors import InvalidArgument
from service.protocol import MAX_PRIORITY, MIN_PRIORITY, PRIORITY_CLASSES, JobSpec

METRICS = {"eval_accuracy": "maximize", "eval_loss": "minimize"}
DIRECTIONS = ("maximize", "minimize")
SEARCHERS = ("grid", "random", "tpe")
EARLY_STOPPING = ("none", "successive_halving")
MAX_PARAMETERS = 16
MAX_VALUES = 64  # of one categorical parameter, or grid points of one float
MAX_TRIALS = 1000
MAX_CONCURRENT_TRIALS = 64

# The TrainConfig fields a parameter may set, by the type of their values.
_TRAIN_FIELDS: dict[str, type] = {
    "learning_rate": float,
    "momentum": float,
    "optimizer": str,
    "batch_size": int,
    "epochs": int,
    "precision": str,
    "initializer": str,
}
_LAYER_FIELD = re.compile(r"layers\[(\d+)\]\.(units|activation)")


@dataclass(frozen=True, kw_only=True)
class IntParameter:
    """Integers in [low, high], every `step`-th from low, or on a log scale."""

    name: str
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True, kw_only=True)
class FloatParameter:
    """Reals in [low, high], linear or log; `grid_points` evenly spaced ones for a grid."""

    name: str
    low: float
    high: float
    log: bool = False
    grid_points: int = 0


@dataclass(frozen=True, kw_only=True)
class CategoricalParameter:
    """One of `values`, given as text ("adam"; "64" for an integer field)."""

    name: str
    values: tuple[str, ...]


Parameter = IntParameter | FloatParameter | CategoricalParameter
_PARAMETER_KINDS: dict[str, type] = {
    "int": IntParameter,
    "float": FloatParameter,
    "categorical": CategoricalParameter,
}


@dataclass(frozen=True, kw_only=True)
class ExperimentSpec:
    """A search: which trials to run (the searcher), how to judge them, when to stop.

    `max_trials` counts every trial started, failed ones too; successive
    halving stops a trial at a rung (min_epochs x reduction_factor^k epochs)
    unless its metric is in the best 1/reduction_factor of the trials that
    reached that rung.
    """

    base: JobSpec
    parameters: tuple[Parameter, ...]
    metric: str = "eval_accuracy"
    direction: str = ""  # empty: the metric's own (accuracy up, loss down)
    searcher: str = "tpe"
    early_stopping: str = "none"
    min_epochs: int = 1
    reduction_factor: int = 3
    max_trials: int = 16
    max_concurrent_trials: int = 1
    max_failed_trials: int = 3
    target: float | None = None  # the experiment ends once a trial's metric reaches it
    seed: int = 0  # the searcher's
    name: str = ""
    # Every trial's JobSpec.priority (the base job's is not used): below normal jobs.
    trial_priority: int = PRIORITY_CLASSES["low"]

    @property
    def maximize(self) -> bool:
        return (self.direction or METRICS.get(self.metric, "maximize")) == "maximize"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for the experiment's storage."""
        data = dataclasses.asdict(self)
        data["base"] = self.base.to_dict()
        data["parameters"] = [
            {"kind": _kind_of(parameter), **dataclasses.asdict(parameter)}
            for parameter in self.parameters
        ]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentSpec:
        fields = dict(data)
        fields["base"] = JobSpec.from_dict(fields["base"])
        parameters = []
        for item in fields["parameters"]:
            item = dict(item)
            kind = _PARAMETER_KINDS[item.pop("kind")]
            if kind is CategoricalParameter:
                item["values"] = tuple(item["values"])
            parameters.append(kind(**item))
        fields["parameters"] = tuple(parameters)
        return cls(**fields)


def _kind_of(parameter: Parameter) -> str:
    return next(name for name, kind in _PARAMETER_KINDS.items() if isinstance(parameter, kind))


def field_type(spec: JobSpec, name: str) -> type:
    """The type of the job field a parameter sets (InvalidArgument: no such field)."""
    if name in _TRAIN_FIELDS:
        return _TRAIN_FIELDS[name]
    found = _LAYER_FIELD.fullmatch(name)
    if found is None:
        raise InvalidArgument(
            f"a parameter's name must be one of {', '.join(_TRAIN_FIELDS)} or "
            f"layers[i].units / layers[i].activation, got {shown(name)}",
            field="name",
        )
    index = int(found[1])
    if index >= len(spec.train.layers) - 1:
        raise InvalidArgument(
            f"{name} names no hidden layer: the base job has "
            f"{len(spec.train.layers) - 1} (the last layer's units are the classes)",
            field="name",
        )
    return int if found[2] == "units" else str


def check_experiment_spec(spec: ExperimentSpec) -> None:
    """Raise InvalidArgument naming the first invalid field (the base job is checked apart)."""
    if not spec.parameters:
        raise InvalidArgument("parameters must hold at least one parameter", field="parameters")
    if len(spec.parameters) > MAX_PARAMETERS:
        raise InvalidArgument(
            f"parameters must hold at most {MAX_PARAMETERS}, got {len(spec.parameters)}",
            field="parameters",
        )
    names = set()
    for index, parameter in enumerate(spec.parameters):
        try:
            _check_parameter(spec, parameter)
        except InvalidArgument as error:
            raise InvalidArgument(
                error.message, field=f"parameters[{index}].{error.field or 'name'}"
            ) from None
        if parameter.name in names:
            raise InvalidArgument(
                f"parameter {parameter.name} is given twice", field=f"parameters[{index}].name"
            )
        names.add(parameter.name)
    _check_choice("metric", spec.metric, tuple(METRICS))
    if spec.direction:
        _check_choice("direction", spec.direction, DIRECTIONS)
    _check_choice("searcher", spec.searcher, SEARCHERS)
    _check_choice("early_stopping", spec.early_stopping, EARLY_STOPPING)
    _check_range("max_trials", spec.max_trials, 1, MAX_TRIALS)
    _check_range("max_concurrent_trials", spec.max_concurrent_trials, 1, MAX_CONCURRENT_TRIALS)
    _check_range("max_failed_trials", spec.max_failed_trials, 0, MAX_TRIALS)
    if spec.early_stopping == "successive_halving":
        _check_range("min_epochs", spec.min_epochs, 1, spec.base.train.epochs)
        _check_range("reduction_factor", spec.reduction_factor, 2, 100)
    if spec.target is not None and not math.isfinite(spec.target):
        raise InvalidArgument(f"target must be finite, got {spec.target!r}", field="target")
    _check_range("seed", spec.seed, 0, 2**31 - 1)
    _check_range("trial_priority", spec.trial_priority, MIN_PRIORITY, MAX_PRIORITY)
    if spec.searcher == "grid":
        for index, parameter in enumerate(spec.parameters):
            if isinstance(parameter, FloatParameter) and parameter.grid_points < 2:
                raise InvalidArgument(
                    "the grid searcher needs grid_points >= 2 for a float parameter",
                    field=f"parameters[{index}].grid_points",
                )


def _check_parameter(spec: ExperimentSpec, parameter: Parameter) -> None:
    kind = field_type(spec.base, parameter.name)
    if isinstance(parameter, CategoricalParameter):
        if not 0 < len(parameter.values) <= MAX_VALUES:
            raise InvalidArgument(
                f"values must hold 1 to {MAX_VALUES} values, got {len(parameter.values)}",
                field="values",
            )
        if len(set(parameter.values)) != len(parameter.values):
            raise InvalidArgument("values must differ from each other", field="values")
        for value in parameter.values:
            parse_value(kind, value)
        return
    if kind is str:
        raise InvalidArgument(
            f"{parameter.name} takes text: give it as a categorical parameter", field="name"
        )
    if isinstance(parameter, IntParameter) and kind is not int:
        raise InvalidArgument(
            f"{parameter.name} takes real numbers: give it as a float parameter", field="name"
        )
    if isinstance(parameter, FloatParameter) and kind is not float:
        raise InvalidArgument(
            f"{parameter.name} takes integers: give it as an int parameter", field="name"
        )
    if not (math.isfinite(parameter.low) and math.isfinite(parameter.high)):
        raise InvalidArgument("low and high must be finite", field="low")
    if not parameter.low < parameter.high:
        raise InvalidArgument(
            f"low must be below high, got {parameter.low!r} and {parameter.high!r}", field="low"
        )
    if parameter.log and parameter.low <= 0:
        raise InvalidArgument(f"a log scale needs low > 0, got {parameter.low!r}", field="low")
    if isinstance(parameter, IntParameter):
        if parameter.step < 1:
            raise InvalidArgument(f"step must be at least 1, got {parameter.step}", field="step")
        if parameter.log and parameter.step != 1:
            raise InvalidArgument("a log scale takes no step (leave it 1)", field="step")
    elif not 0 <= parameter.grid_points <= MAX_VALUES:
        raise InvalidArgument(
            f"grid_points must be in 0..{MAX_VALUES}, got {parameter.grid_points}",
            field="grid_points",
        )


def parse_value(kind: type, text: str) -> Any:
    """A categorical value as the field's type (InvalidArgument when it is not one)."""
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise InvalidArgument(
            f"values must be {kind.__name__}s for this field, got {shown(text)}", field="values"
        ) from None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidArgument(
            f"{name} must be one of {', '.join(choices)}, got {shown(value)}", field=name
        )


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be in {low}..{high}, got {value}", field=name)


def corner_values(parameter: Parameter) -> tuple[Any, ...]:
    """The extremes of a parameter (every value of a categorical one): a base job is
    checked with each before any trial runs."""
    if isinstance(parameter, CategoricalParameter):
        return parameter.values
    return (parameter.low, parameter.high)


def trial_spec(
    spec: ExperimentSpec, experiment_id: str, number: int, params: Mapping[str, Any]
) -> JobSpec:
    """The job of trial `number`: the base job with the trial's parameter values.

    The same arguments give an equal spec, so a trial submitted again under its
    request_id after a restart names the same job.
    """
    base = spec.base
    train_fields: dict[str, Any] = {}
    layers = list(base.train.layers)
    for name, value in params.items():
        kind = field_type(base, name)
        value = parse_value(kind, value) if isinstance(value, str) else kind(value)
        found = _LAYER_FIELD.fullmatch(name)
        if found is None:
            train_fields[name] = value
        else:
            index = int(found[1])
            layers[index] = dataclasses.replace(layers[index], **{found[2]: value})
    train = dataclasses.replace(base.train, layers=tuple(layers), **train_fields)
    labels = dict(base.labels) | {"experiment": experiment_id, "trial": str(number)}
    return dataclasses.replace(
        base,
        train=train,
        name=f"{spec.name or experiment_id} trial {number}",
        labels=tuple(sorted(labels.items())),
        priority=spec.trial_priority,
    )


def trial_request_id(experiment_id: str, number: int) -> str:
    """The trial's job's request_id: a restart that submits it again finds the same job."""
    return f"{experiment_id}-trial-{number}"


_EXPERIMENT_ID = re.compile(r"exp-[0-9a-f]{12}")


def check_experiment_id(experiment_id: str) -> None:
    if not _EXPERIMENT_ID.fullmatch(experiment_id):
        raise InvalidArgument(
            "experiment_id must be an experiment id such as 'exp-1a2b3c4d5e6f', "
            f"got {shown(experiment_id)}"
        )
