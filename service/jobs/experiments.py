"""Experiments: a hyperparameter search whose trials are ordinary jobs, driven by Optuna.

One loop owns every experiment's state, as `JobController` owns the jobs':
RPC handlers post requests (submit, cancel) and read immutable snapshots
(`ExperimentRecord`); the job loop tells it of each trial's stored events
(it is a `JobObserver`: it queues them and returns at once). It decides on a
thread of its own, so Optuna's sampling and its SQLite writes never hold up
the job loop, and it submits trials through `JobManager.submit`, which waits
for the job loop's answer (never done on the job loop's thread).

The searcher is Optuna's ask-and-tell over its RDB storage, a SQLite file
under the state directory (`experiments.db`): a study per experiment, its
trials with their parameters, each epoch's metric (`report`), the pruner's
rungs, and each trial's end (`tell`); the experiment's own spec, owner and
state are the study's user attributes. Every decision is stored before it is
acted on: a trial is asked and its parameters stored before its job is
submitted under a request_id made from its number (`<experiment>-trial-<n>`);
a trial's stop at a rung is stored before its job is canceled; the
experiment's end before its trials are canceled. After a crash the loop
reconciles each unfinished trial with its job, reading the job's events
again: a trial asked but not submitted is submitted (the same request_id
names the same job if it was), metrics not yet reported are reported, a job
that ended is told. So no trial runs twice and none is lost.

Samplers hold their random state in memory; a fresh one seeded with the
experiment's seed plus the trial's number is made for each ask, so a search
restarted after a crash asks what it would have asked.

Tests only: `NTRAIN_TEST_EXPERIMENT_PAUSE=<point>:<trial>` (point `asked`:
after the trial was asked and its parameters stored, before its job is
submitted; `told`: after its end was told, before the next ask) makes the loop
write `experiment-paused` in the state directory and stop there for good, so a
test can kill the server at that exact point (tests/test_experiments_crash.py).
"""

from __future__ import annotations

import builtins
import enum
import functools
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial
from optuna.trial import TrialState as OptunaState

from service.jobs.access import LOCAL, TRAINER, Action, Principal, authorize, may_see_request_id
from service.jobs.controller import CancelJob, JobController
from service.jobs.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from service.jobs.experiment_spec import (
    CategoricalParameter,
    ExperimentSpec,
    FloatParameter,
    IntParameter,
    check_experiment_spec,
    corner_values,
    trial_request_id,
    trial_spec,
)
from service.jobs.feed import JobFeed
from service.jobs.store import Event, JobRecord, Store
from service.protocol import EpochEnd, JobSpec, JobState, StateChange, TrainingResult

log = logging.getLogger(__name__)

PAUSE_ENV = "NTRAIN_TEST_EXPERIMENT_PAUSE"
PAUSED_FILE = "experiment-paused"
# Experiments not yet ended at once; past it SubmitExperiment is RESOURCE_EXHAUSTED.
# It also bounds the per-experiment metric series (service.metrics).
MAX_RUNNING_EXPERIMENTS = 16
# How often trials that could not be submitted (a full queue) are tried again.
RETRY_SECONDS = 5.0
WATCH_POLL_SECONDS = 1.0
# Warm workers held while a search has trials to come (see _prewarm_beside).
PREWARMED_TRIALS = 2

optuna.logging.set_verbosity(optuna.logging.WARNING)


class ExperimentState(enum.Enum):
    """Values are the contract's `ExperimentState` numbers."""

    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3
    CANCELED = 4


class TrialState(enum.Enum):
    """Values are the contract's `TrialState` numbers."""

    PENDING = 1  # asked; its job not submitted yet
    QUEUED = 2
    RUNNING = 3
    SUCCEEDED = 4
    STOPPED_EARLY = 5  # stopped at a rung by successive halving
    FAILED = 6
    CANCELED = 7  # its experiment ended (canceled, target reached) before it did

    @property
    def finished(self) -> bool:
        return self.value >= TrialState.SUCCEEDED.value


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    number: int
    params: tuple[tuple[str, Any], ...]
    job_id: str
    state: TrialState
    epochs: int  # epochs trained (reported)
    metric: float | None  # the final one, else the latest epoch's
    stopped_early_at: int = 0  # the epoch it was stopped at (0: not stopped)
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class ExperimentRecord:
    experiment_id: str
    request_id: str
    owner: str
    spec: ExperimentSpec
    state: ExperimentState
    reason: str
    create_time: float
    end_time: float | None
    trials: tuple[TrialRecord, ...] = ()
    best_trial: int | None = None  # the number of the best finished trial

    @property
    def settled(self) -> bool:
        """Ended, and so has every trial: nothing more will change."""
        return self.state is not ExperimentState.RUNNING and all(
            trial.state.finished for trial in self.trials
        )


class ExperimentMetrics(Protocol):
    """The hooks of `service.metrics.ServiceMetrics` the experiments' loop calls."""

    def set_experiment_trials(self, experiment_id: str, counts: Mapping[str, int]) -> None: ...
    def set_experiment_best(self, experiment_id: str, metric: str, value: float) -> None: ...
    def experiment_ended(self, experiment_id: str) -> None: ...


class TrialJobs(Protocol):
    """What the loop needs of the jobs' side (`JobManager`)."""

    feed: JobFeed
    store: Store
    controller: JobController

    def submit(self, spec: JobSpec, request_id: str = "", *, principal: Principal) -> JobRecord: ...
    def check_spec(self, spec: JobSpec) -> None: ...
    def prewarm(self, count: int = 1) -> None: ...


# -- messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Submit:
    spec: ExperimentSpec
    owner: str
    request_id: str


@dataclass(frozen=True)
class _Cancel:
    experiment_id: str


@dataclass(frozen=True)
class _TrialsChanged:
    """Trials' jobs of the experiments in `_changed_experiments` changed."""


_QUIT = object()


@dataclass
class _Experiment:
    """What the loop keeps of one experiment; its truth is in the study."""

    experiment_id: str
    study: optuna.Study
    spec: ExperimentSpec
    owner: str
    request_id: str
    create_time: float
    state: ExperimentState = ExperimentState.RUNNING
    reason: str = ""
    end_time: float | None = None
    cancels_posted: set[str] = field(default_factory=set)
    # Per trial's job: the last event read, and the metric of each epoch read so far.
    epoch_metrics: dict[str, tuple[int, dict[int, float]]] = field(default_factory=dict)
    waiting: bool = False  # a trial's submission was refused for now (a full queue)
    prewarmed: set[str] = field(default_factory=set)  # trials' jobs a worker was warmed beside


class ExperimentManager:
    """Runs experiments: owns their state on a thread of its own, answers from snapshots.

    Args:
        state_dir: the server's state directory; the search's storage is
            `experiments.db` in it.
        metrics: trials by state and the best metric, per experiment.
        on_change: called with each new snapshot of an experiment, on this
            loop's thread (the MLflow tracker's `experiment_changed`: it only
            queues); it must not block or raise.
        pause_at: the test hook described in the module's docstring.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        metrics: ExperimentMetrics | None = None,
        on_change: Callable[[ExperimentRecord], None] | None = None,
        pause_at: str | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.state_dir = Path(state_dir)
        self._storage_url = f"sqlite:///{self.state_dir / 'experiments.db'}"
        self._metrics = metrics
        self._on_change = on_change
        self._pause_at = os.environ.get(PAUSE_ENV, "") if pause_at is None else pause_at
        self._clock = clock
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._experiments: dict[str, _Experiment] = {}
        self._records: dict[str, ExperimentRecord] = {}
        self._changed = threading.Condition()
        # Experiments whose trials' jobs changed since the loop last looked; the job
        # loop adds to it, this loop takes it whole (this module's lock only).
        self._changed_experiments: set[str] = set()
        self._changed_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._jobs: TrialJobs | None = None
        self._storage: optuna.storages.RDBStorage | None = None

    # -- the job loop's side: told of trials' events ---------------------------------

    def job_event(self, record: JobRecord, event: Event) -> None:
        """A trial's job changed (called on the job loop's thread: only notes it).

        Changes are coalesced: one wake-up of the loop reconciles every
        experiment that changed since, however many events came in between.
        """
        if isinstance(event.payload, StateChange | EpochEnd | TrainingResult):
            labels = dict(record.spec.labels)
            if "experiment" in labels and "trial" in labels:
                with self._changed_lock:
                    wake = not self._changed_experiments
                    self._changed_experiments.add(labels["experiment"])
                if wake:
                    self._inbox.put((_TrialsChanged(), None))

    # -- start and stop ---------------------------------------------------------------

    def start(self, jobs: TrialJobs) -> None:
        """Open the storage, take over the experiments an earlier server left, then serve."""
        self._jobs = jobs
        self._storage = open_storage(self._storage_url)
        self._recover()
        self._thread = threading.Thread(target=self._serve, name="experiments", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Decide nothing more; trials go on as jobs and are reconciled on the next start."""
        self._closed = True
        if self._thread is not None:
            self._inbox.put(_QUIT)
            self._thread.join(30)
        with self._changed:
            self._changed.notify_all()

    def _serve(self) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=RETRY_SECONDS)
            except queue.Empty:
                self._retry_waiting()
                continue
            if item is _QUIT:
                return
            message, future = item
            try:
                result = self._decide(message)
            except Exception as error:
                if future is None:
                    log.exception("the experiments' loop failed on %s", message)
                else:
                    future.set_exception(error)
            else:
                if future is not None:
                    future.set_result(result)

    def _call(self, message: Any, timeout: float = 120.0) -> Any:
        if self._closed or self._thread is None:
            raise Unavailable("the server is not running experiments (starting or stopping)")
        future: Future = Future()
        self._inbox.put((message, future))
        return future.result(timeout)

    # -- requests (RPC handler threads) ----------------------------------------------

    def submit(
        self, spec: ExperimentSpec, request_id: str = "", *, principal: Principal = LOCAL
    ) -> ExperimentRecord:
        """Start an experiment, or return the one `principal` submitted under `request_id`.

        Raises:
            PermissionDenied: the principal may not submit.
            InvalidArgument: the spec, or its base job with a value of the space, is invalid.
            AlreadyExists: `request_id` names another experiment of this owner.
            ResourceExhausted: MAX_RUNNING_EXPERIMENTS are running.
        """
        authorize(principal, Action.SUBMIT)
        check_experiment_spec(spec)
        self._check_space(spec)
        record = self._call(_Submit(spec, principal.name, request_id))
        return _as_seen_by(principal, record)

    def _check_space(self, spec: ExperimentSpec) -> None:
        """The base job, and the base job with each extreme of each parameter, are valid."""
        assert self._jobs is not None
        self._jobs.check_spec(spec.base)
        for parameter in spec.parameters:
            for value in corner_values(parameter):
                self._jobs.check_spec(trial_spec(spec, "exp-check", 0, {parameter.name: value}))

    def get(self, experiment_id: str, *, principal: Principal = LOCAL) -> ExperimentRecord:
        record = self._records.get(experiment_id)
        if record is None:
            raise NotFound(f"experiment {experiment_id!r} does not exist")
        return _as_seen_by(principal, record)

    def list(
        self, *, limit: int = 50, principal: Principal = LOCAL
    ) -> builtins.list[ExperimentRecord]:
        """Every owner's experiments, newest first."""
        records = sorted(self._records.values(), key=lambda r: r.create_time, reverse=True)
        return [_as_seen_by(principal, record) for record in records[:limit]]

    def cancel(self, experiment_id: str, *, principal: Principal = LOCAL) -> ExperimentRecord:
        """End a running experiment; its running trials' jobs are canceled.

        Raises:
            NotFound, PermissionDenied, FailedPrecondition: it has already ended.
        """
        authorize(principal, Action.CANCEL, self.get(experiment_id).owner)
        return _as_seen_by(principal, self._call(_Cancel(experiment_id)))

    def watch(
        self, experiment_id: str, *, is_active: Callable[[], bool] = lambda: True
    ) -> Iterator[ExperimentRecord]:
        """The experiment now, then again each time it changes, until it has settled."""
        record = self.get(experiment_id)
        return self._follow(record, is_active)

    def _follow(
        self, record: ExperimentRecord, is_active: Callable[[], bool]
    ) -> Iterator[ExperimentRecord]:
        yield record
        experiment_id = record.experiment_id
        while not record.settled and is_active():
            if self._closed:  # it goes on after the next start, where the client reconnects
                raise Unavailable(
                    "the server is shutting down; the experiment goes on when it is back: reconnect"
                )
            with self._changed:
                self._changed.wait_for(
                    functools.partial(self._moved_on, record), WATCH_POLL_SECONDS
                )
            newer = self._records[experiment_id]
            if newer is not record:
                record = newer
                yield record

    def _moved_on(self, seen: ExperimentRecord) -> bool:
        return self._records[seen.experiment_id] is not seen or self._closed

    # -- decisions (the loop's thread) ------------------------------------------------

    def _decide(self, message: Any) -> Any:
        if isinstance(message, _TrialsChanged):
            with self._changed_lock:
                changed, self._changed_experiments = self._changed_experiments, set()
            for experiment_id in sorted(changed):
                experiment = self._experiments.get(experiment_id)
                if experiment is not None:
                    self._reconcile(experiment)
            return None
        if isinstance(message, _Submit):
            return self._create(message)
        if isinstance(message, _Cancel):
            return self._cancel(message.experiment_id)
        raise TypeError(f"the experiments' loop takes no {message!r}")

    def _create(self, message: _Submit) -> ExperimentRecord:
        if message.request_id:
            for experiment in self._experiments.values():
                if (experiment.owner, experiment.request_id) == (message.owner, message.request_id):
                    if experiment.spec != message.spec:
                        raise AlreadyExists(
                            f"request_id {message.request_id!r} was used for experiment "
                            f"{experiment.experiment_id} with a different spec"
                        )
                    return self._records[experiment.experiment_id]
        running = sum(1 for e in self._experiments.values() if e.state is ExperimentState.RUNNING)
        if running >= MAX_RUNNING_EXPERIMENTS:
            raise ResourceExhausted(
                f"{running} experiments are running, the server's limit; cancel one or retry later"
            )
        experiment_id = f"exp-{uuid.uuid4().hex[:12]}"
        spec = message.spec
        study = optuna.create_study(
            storage=self._storage,
            study_name=experiment_id,
            direction="maximize" if spec.maximize else "minimize",
            pruner=_pruner(spec),
        )
        now = self._clock()
        study.set_user_attr("spec", spec.to_dict())
        study.set_user_attr("owner", message.owner)
        study.set_user_attr("request_id", message.request_id or f"auto-{experiment_id}")
        study.set_user_attr("create_time", now)
        # Last: a study without a state was never acknowledged, and is dropped on recovery.
        study.set_user_attr("state", ExperimentState.RUNNING.name)
        experiment = _Experiment(
            experiment_id=experiment_id,
            study=study,
            spec=spec,
            owner=message.owner,
            request_id=message.request_id or f"auto-{experiment_id}",
            create_time=now,
        )
        self._experiments[experiment_id] = experiment
        log.info("experiment %s: %s", experiment_id, _describe(spec))
        self._reconcile(experiment)
        return self._records[experiment_id]

    def _cancel(self, experiment_id: str) -> ExperimentRecord:
        experiment = self._experiments[experiment_id]
        if experiment.state is not ExperimentState.RUNNING:
            raise FailedPrecondition(
                f"experiment {experiment_id} already ended {experiment.state.name}; only a "
                "running experiment can be canceled"
            )
        self._end(experiment, ExperimentState.CANCELED, "canceled by request")
        self._reconcile(experiment)
        return self._records[experiment_id]

    def _recover(self) -> None:
        assert self._storage is not None
        for summary in self._storage.get_all_studies():
            attrs = summary.user_attrs
            if "state" not in attrs:  # crashed while being created, never acknowledged
                optuna.delete_study(study_name=summary.study_name, storage=self._storage)
                continue
            spec = ExperimentSpec.from_dict(attrs["spec"])
            experiment = _Experiment(
                experiment_id=summary.study_name,
                study=optuna.load_study(
                    study_name=summary.study_name, storage=self._storage, pruner=_pruner(spec)
                ),
                spec=spec,
                owner=attrs["owner"],
                request_id=attrs["request_id"],
                create_time=attrs["create_time"],
                state=ExperimentState[attrs["state"]],
                reason=attrs.get("reason", ""),
                end_time=attrs.get("end_time"),
            )
            self._experiments[experiment.experiment_id] = experiment
            self._reconcile(experiment)

    def _retry_waiting(self) -> None:
        for experiment in self._experiments.values():
            if experiment.waiting:
                self._reconcile(experiment)

    def _reconcile(self, experiment: _Experiment) -> None:
        """Bring the experiment up to date with its trials' jobs, decide, and publish it."""
        experiment.waiting = False
        for trial in experiment.study.get_trials(deepcopy=False):
            if not trial.state.is_finished():
                self._reconcile_trial(experiment, trial)
        if experiment.state is ExperimentState.RUNNING:
            ended = self._check_end(experiment)
            if ended is not None:
                self._end(experiment, *ended)
                for trial in experiment.study.get_trials(deepcopy=False):
                    if not trial.state.is_finished():
                        self._reconcile_trial(experiment, trial)
            else:
                self._ask_more(experiment)
        self._publish(experiment)

    def _reconcile_trial(self, experiment: _Experiment, trial: FrozenTrial) -> None:
        """One unfinished trial against its job: submit, report, stop early, or tell."""
        assert self._jobs is not None
        job = self._job_of(experiment, trial)
        if job is None:
            if experiment.state is ExperimentState.RUNNING:
                self._submit_trial(experiment, trial)
            else:
                self._tell_ended(experiment, trial, "canceled", "the experiment ended first")
            return
        if "job_id" not in trial.user_attrs:
            experiment.study._storage.set_trial_user_attr(trial._trial_id, "job_id", job.job_id)
        stopped_at = trial.user_attrs.get("stopped_early_at")
        new = [
            (epoch, value)
            for epoch, value in self._epoch_metrics(experiment, job.job_id)
            if epoch not in trial.intermediate_values
        ]
        live = optuna.trial.Trial(experiment.study, trial._trial_id) if new else None
        for epoch, value in new:
            assert live is not None
            live.report(value, epoch)
            if (
                stopped_at is None
                and experiment.spec.early_stopping == "successive_halving"
                and experiment.state is ExperimentState.RUNNING
                and not job.finished
                and epoch < job.spec.train.epochs
                and live.should_prune()
            ):
                # Stored before the job is stopped: a restart stops it again, never runs it on.
                live.set_user_attr("stopped_early_at", epoch)
                stopped_at = epoch
        if not job.finished:
            if stopped_at is not None or experiment.state is not ExperimentState.RUNNING:
                self._cancel_job(experiment, job.job_id)
            elif job.state is JobState.RUNNING:
                self._prewarm_beside(experiment, job.job_id)
            return
        if job.state is JobState.SUCCEEDED:
            final = _final_metric(experiment.spec, job)
            if final is None:
                values = experiment.study._storage.get_trial(trial._trial_id).intermediate_values
                final = values[max(values)] if values else math.nan
            experiment.study.tell(trial.number, final)
        elif job.state is JobState.CANCELED and stopped_at is not None:
            experiment.study.tell(trial.number, state=OptunaState.PRUNED)
        elif job.state is JobState.CANCELED:
            self._tell_ended(experiment, trial, "canceled", job.transitions[-1].reason)
        else:
            self._tell_ended(experiment, trial, "failed", job.failure_reason)
        self._pause("told", trial.number)

    def _prewarm_beside(self, experiment: _Experiment, job_id: str) -> None:
        """A trial started and others will follow: have workers ready for the next two.

        The warm pool otherwise refills only when nothing runs or waits, which
        in a search is the moment the next trial is submitted: each trial would
        pay TensorFlow's import and the data set's load (two thirds of a
        successive-halving search's wall time in benchmarks/sweep.py). One
        worker warmed beside a trial stopped after an epoch is still importing
        when the next trial takes it; two give each a trial more.
        """
        assert self._jobs is not None
        if job_id in experiment.prewarmed:
            return
        experiment.prewarmed.add(job_id)
        to_come = _budget(experiment.spec) - len(experiment.study.get_trials(deepcopy=False))
        if to_come > 0:
            self._jobs.prewarm(min(PREWARMED_TRIALS, to_come))

    def _tell_ended(
        self, experiment: _Experiment, trial: FrozenTrial, end: str, reason: str
    ) -> None:
        storage = experiment.study._storage
        storage.set_trial_user_attr(trial._trial_id, "end", end)
        storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        experiment.study.tell(trial.number, state=OptunaState.FAIL)

    def _job_of(self, experiment: _Experiment, trial: FrozenTrial) -> JobRecord | None:
        assert self._jobs is not None
        job_id = trial.user_attrs.get("job_id")
        if job_id:
            return self._jobs.feed.record(job_id)
        return self._jobs.store.find_by_request_id(
            experiment.owner, trial_request_id(experiment.experiment_id, trial.number)
        )

    def _epoch_metrics(
        self, experiment: _Experiment, job_id: str
    ) -> builtins.list[tuple[int, float]]:
        """(epoch, metric) of each evaluated epoch of the job, in order.

        Read from the job's events once each: what was read is kept per job.
        """
        assert self._jobs is not None
        last, found = experiment.epoch_metrics.get(job_id, (0, {}))
        while True:
            events = self._jobs.feed.events_after(job_id, last)
            if not events:
                break
            for event in events:
                payload = event.payload
                if isinstance(payload, EpochEnd):
                    value = (
                        payload.eval_accuracy
                        if experiment.spec.metric == "eval_accuracy"
                        else payload.eval_loss
                    )
                    if value is not None:
                        found[payload.epoch] = value
            last = events[-1].sequence
        experiment.epoch_metrics[job_id] = (last, found)
        return sorted(found.items())

    def _submit_trial(self, experiment: _Experiment, trial: FrozenTrial) -> None:
        """Submit the trial's job under its request_id (the same job if it was submitted)."""
        assert self._jobs is not None
        live = optuna.trial.Trial(experiment.study, trial._trial_id)
        # Already-stored parameters come back as they were; any not stored yet (a crash
        # between two suggestions) are sampled as the first ask would have.
        experiment.study.sampler = _sampler(experiment.spec, trial.number)
        params = _suggest(live, experiment.spec)
        spec = trial_spec(experiment.spec, experiment.experiment_id, trial.number, params)
        try:
            job = self._jobs.submit(
                spec,
                trial_request_id(experiment.experiment_id, trial.number),
                principal=Principal(name=experiment.owner, role=TRAINER),
            )
        except (ResourceExhausted, Unavailable) as error:
            log.info("trial %s of %s waits: %s", trial.number, experiment.experiment_id, error)
            experiment.waiting = True
            return
        except ServiceError as error:  # a sampled combination the job refuses
            self._tell_ended(experiment, trial, "failed", f"not submitted: {error.message}")
            return
        live.set_user_attr("job_id", job.job_id)

    def _ask_more(self, experiment: _Experiment) -> None:
        """Ask for trials while the budget and max_concurrent_trials allow."""
        spec = experiment.spec
        while not experiment.waiting:
            trials = experiment.study.get_trials(deepcopy=False)
            active = sum(1 for trial in trials if not trial.state.is_finished())
            if len(trials) >= _budget(spec) or active >= spec.max_concurrent_trials:
                return
            experiment.study.sampler = _sampler(spec, len(trials))
            asked = experiment.study.ask()
            _suggest(asked, spec)  # each parameter is stored as it is suggested
            self._pause("asked", asked.number)
            self._submit_trial(experiment, experiment.study._storage.get_trial(asked._trial_id))

    def _check_end(self, experiment: _Experiment) -> tuple[ExperimentState, str] | None:
        spec = experiment.spec
        trials = experiment.study.get_trials(deepcopy=False)
        failed = sum(1 for trial in trials if trial.user_attrs.get("end") == "failed")
        if failed > spec.max_failed_trials:
            return ExperimentState.FAILED, (
                f"{failed} trials failed, more than max_failed_trials ({spec.max_failed_trials})"
            )
        if spec.target is not None:
            for trial in trials:
                if trial.state is OptunaState.COMPLETE and _reaches(spec, trial.value, spec.target):
                    return ExperimentState.SUCCEEDED, (
                        f"trial {trial.number} reached the target {spec.target:g}"
                    )
        if len(trials) >= _budget(spec) and all(trial.state.is_finished() for trial in trials):
            return ExperimentState.SUCCEEDED, f"all {len(trials)} trials ran"
        return None

    def _end(self, experiment: _Experiment, state: ExperimentState, reason: str) -> None:
        """Store the experiment's end first; its unfinished trials are canceled after."""
        now = self._clock()
        study = experiment.study
        study.set_user_attr("reason", reason)
        study.set_user_attr("end_time", now)
        study.set_user_attr("state", state.name)
        experiment.state, experiment.reason, experiment.end_time = state, reason, now
        log.info("experiment %s %s: %s", experiment.experiment_id, state.name, reason)
        if self._jobs is not None:
            self._jobs.prewarm(1)  # the idle machine's one warm worker, not a search's two

    def _cancel_job(self, experiment: _Experiment, job_id: str) -> None:
        """Ask the job loop to cancel a trial's job (once per server; no waiting here)."""
        assert self._jobs is not None
        if job_id in experiment.cancels_posted:
            return
        experiment.cancels_posted.add(job_id)
        future = self._jobs.controller.post(CancelJob(job_id))
        future.add_done_callback(_log_cancel_failure)

    def _pause(self, point: str, number: int) -> None:
        if self._pause_at == f"{point}:{number}":
            (self.state_dir / PAUSED_FILE).write_text(f"{point}:{number}\n")
            log.warning("paused at %s:%s (%s): waiting to be killed", point, number, PAUSE_ENV)
            threading.Event().wait()

    # -- snapshots -----------------------------------------------------------------------

    def _publish(self, experiment: _Experiment) -> None:
        trials = tuple(
            self._trial_record(experiment, trial)
            for trial in experiment.study.get_trials(deepcopy=False)
        )
        spec = experiment.spec
        finished = [
            trial
            for trial in trials
            if trial.state is TrialState.SUCCEEDED and trial.metric is not None
        ]
        best = None
        if finished:
            pick = max if spec.maximize else min
            best = pick(finished, key=lambda trial: trial.metric or 0.0).number
        record = ExperimentRecord(
            experiment_id=experiment.experiment_id,
            request_id=experiment.request_id,
            owner=experiment.owner,
            spec=spec,
            state=experiment.state,
            reason=experiment.reason,
            create_time=experiment.create_time,
            end_time=experiment.end_time,
            trials=trials,
            best_trial=best,
        )
        self._records = {**self._records, experiment.experiment_id: record}
        with self._changed:
            self._changed.notify_all()
        if self._metrics is not None:
            self._report_metrics(record)
        if self._on_change is not None:
            self._on_change(record)

    def _report_metrics(self, record: ExperimentRecord) -> None:
        assert self._metrics is not None
        counts = {state.name.lower(): 0 for state in TrialState}
        for trial in record.trials:
            counts[trial.state.name.lower()] += 1
        self._metrics.set_experiment_trials(record.experiment_id, counts)
        if record.best_trial is not None:
            metric = record.trials[record.best_trial].metric
            if metric is not None:
                self._metrics.set_experiment_best(record.experiment_id, record.spec.metric, metric)
        if record.settled:  # its series go once the retention window has passed
            self._metrics.experiment_ended(record.experiment_id)

    def _trial_record(self, experiment: _Experiment, trial: FrozenTrial) -> TrialRecord:
        assert self._jobs is not None
        attrs = trial.user_attrs
        job_id = attrs.get("job_id", "")
        values = trial.intermediate_values
        metric = trial.value if trial.value is not None else values.get(max(values, default=0))
        reason = attrs.get("reason", "")
        if trial.state is OptunaState.COMPLETE:
            state = TrialState.SUCCEEDED
        elif trial.state is OptunaState.PRUNED:
            state = TrialState.STOPPED_EARLY
        elif trial.state is OptunaState.FAIL:
            state = TrialState.CANCELED if attrs.get("end") == "canceled" else TrialState.FAILED
        elif not job_id:
            state = TrialState.PENDING
        else:
            try:
                job_state = self._jobs.feed.record(job_id).state
            except NotFound:
                job_state = JobState.QUEUED
            state = TrialState.QUEUED if job_state is JobState.QUEUED else TrialState.RUNNING
        return TrialRecord(
            number=trial.number,
            params=tuple(
                (p.name, trial.params[p.name])
                for p in experiment.spec.parameters
                if p.name in trial.params
            ),
            job_id=job_id,
            state=state,
            epochs=max(values, default=0),
            metric=None if metric is None or math.isnan(metric) else metric,
            stopped_early_at=attrs.get("stopped_early_at", 0),
            reason=reason,
        )


# -- Optuna's side ------------------------------------------------------------------------


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on SQLite, written as the job store is (WAL, NORMAL sync).

    WAL with NORMAL sync survives a process crash (kill -9): a commit is in the
    WAL before it returns; only an OS crash may lose the last transactions.
    Without it every report of an epoch's metric waits for an fsync.
    """
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
    storage.engine.dispose()  # connections made before the listener reconnect with it
    return storage


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sampler(spec: ExperimentSpec, number: int) -> optuna.samplers.BaseSampler:
    """The searcher for the ask of trial `number`, seeded by the experiment's seed and it."""
    if spec.searcher == "grid":
        # The grid's order is shuffled by its seed, and trial n takes its n-th point:
        # the same seed for every ask.
        return _GridSampler(_grid(spec), seed=spec.seed)
    seed = (spec.seed + number) % 2**31
    if spec.searcher == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # TPE models the search once its start-up trials (random ones) have run.
    startup = max(2, min(10, spec.max_trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, without its stop of an `optimize` loop (the budget ends the search)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def _pruner(spec: ExperimentSpec) -> optuna.pruners.BasePruner:
    if spec.early_stopping == "successive_halving":
        return PatientHalvingPruner(
            min_resource=spec.min_epochs,
            reduction_factor=spec.reduction_factor,
            min_early_stopping_rate=0,
        )
    return optuna.pruners.NopPruner()


RUNG_KEY_PREFIX = "completed_rung_"  # Optuna's system attribute: a trial's value at rung k


class PatientHalvingPruner(optuna.pruners.SuccessiveHalvingPruner):
    """Optuna's successive halving, but no trial is stopped on fewer than reduction_factor.

    Optuna judges a trial at a rung against the trials that reached it so far
    and, while fewer than reduction_factor have, lets only the best go on: the
    second trial of a search is stopped for good whenever the first was ahead
    of it after one epoch, however it would have ended. ASHA as published (Li
    et al., MLSys 2020) promotes nothing from a rung that holds fewer than
    reduction_factor trials; it pauses them and decides later, which Optuna
    cannot do (a pruned trial does not come back). Here such a trial goes on
    instead: at most reduction_factor - 1 trials a rung train further than
    Optuna would let them. In benchmarks/sweep.py's 16-trial search this
    keeps the trial that random search found best (stopped at epoch 1
    otherwise, 0.38 points behind) for 2 epochs more in all (34 against 32).

    Optuna's own rule still decides every other trial, and records each
    trial's value at each rung it reaches, which the count below reads.
    """

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if not super().prune(study, trial):
            return False
        # It was judged at its newest recorded rung: how many trials reached that one?
        fresh = study._storage.get_trial(trial._trial_id)
        rung = max(_rungs_reached(fresh), default=None)
        if rung is None:  # stopped for a NaN before any rung was recorded
            return True
        key = f"{RUNG_KEY_PREFIX}{rung}"
        reached = sum(1 for other in study.get_trials(deepcopy=False) if key in other.system_attrs)
        return reached >= self._reduction_factor


def _rungs_reached(trial: FrozenTrial) -> list[int]:
    return [
        int(name[len(RUNG_KEY_PREFIX) :])
        for name in trial.system_attrs
        if name.startswith(RUNG_KEY_PREFIX)
    ]


def _grid(spec: ExperimentSpec) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for parameter in spec.parameters:
        if isinstance(parameter, CategoricalParameter):
            grid[parameter.name] = list(parameter.values)
        elif isinstance(parameter, IntParameter):
            grid[parameter.name] = list(range(parameter.low, parameter.high + 1, parameter.step))
        else:
            n = parameter.grid_points
            if parameter.log:
                low, high = math.log(parameter.low), math.log(parameter.high)
                grid[parameter.name] = [
                    math.exp(low + (high - low) * i / (n - 1)) for i in range(n)
                ]
            else:
                step = (parameter.high - parameter.low) / (n - 1)
                grid[parameter.name] = [parameter.low + step * i for i in range(n)]
            grid[parameter.name][-1] = parameter.high  # exactly, not a rounding below it
    return grid


def _budget(spec: ExperimentSpec) -> int:
    """Trials to run in all: max_trials, or fewer when a grid has fewer points."""
    if spec.searcher != "grid":
        return spec.max_trials
    return min(spec.max_trials, math.prod(len(values) for values in _grid(spec).values()))


def _suggest(trial: optuna.Trial, spec: ExperimentSpec) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for parameter in spec.parameters:
        if isinstance(parameter, IntParameter):
            params[parameter.name] = trial.suggest_int(
                parameter.name, parameter.low, parameter.high, step=parameter.step,
                log=parameter.log,
            )  # fmt: skip
        elif isinstance(parameter, FloatParameter):
            params[parameter.name] = trial.suggest_float(
                parameter.name, parameter.low, parameter.high, log=parameter.log
            )
        else:
            params[parameter.name] = trial.suggest_categorical(
                parameter.name, list(parameter.values)
            )
    return params


def _final_metric(spec: ExperimentSpec, job: JobRecord) -> float | None:
    if job.result is None:
        return None
    if spec.metric == "eval_accuracy":
        return job.result.test_accuracy
    return job.result.test_loss


def _reaches(spec: ExperimentSpec, value: float | None, target: float) -> bool:
    if value is None or math.isnan(value):
        return False
    return value >= target if spec.maximize else value <= target


def _describe(spec: ExperimentSpec) -> str:
    return json.dumps(
        {
            "searcher": spec.searcher,
            "early_stopping": spec.early_stopping,
            "max_trials": spec.max_trials,
            "parameters": [parameter.name for parameter in spec.parameters],
        }
    )


def _log_cancel_failure(future: Future) -> None:
    error = future.exception()
    if error is not None and not isinstance(error, FailedPrecondition | NotFound):
        log.warning("canceling a trial's job failed: %s", error)


def _as_seen_by(principal: Principal, record: ExperimentRecord) -> ExperimentRecord:
    if may_see_request_id(principal, record.owner):
        return record
    return ExperimentRecord(**{**record.__dict__, "request_id": ""})
