"""Experiments' decisions against a real job loop with scripted runners: no process, no TensorFlow.

The job loop (`JobController`) runs on its thread over a store on disk; each
run is a `ScriptedRunner` that reports an evaluated epoch every few
milliseconds, with an accuracy that follows the trial's learning rate, and
ends as a worker would (SUCCEEDED, or CANCELED when stopped). The
experiments' loop drives it through the same seam as in the server.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from naive_model.config import TrainConfig
from naive_model.results import EpochEnd, TrainingResult
from service.jobs.access import Principal
from service.jobs.controller import JobController, Placement, SubmitJob
from service.jobs.errors import FailedPrecondition, InvalidArgument, Unavailable
from service.jobs.experiment_spec import (
    CategoricalParameter,
    ExperimentSpec,
    FloatParameter,
    IntParameter,
    check_experiment_spec,
    trial_spec,
)
from service.jobs.experiments import ExperimentManager, ExperimentState, TrialState
from service.jobs.feed import JobFeed
from service.jobs.runner import RunEnd, RunOutcome, Stop
from service.jobs.scheduler import Demand, Scheduler, demand_for
from service.jobs.store import Store
from service.metrics import ServiceMetrics
from service.protocol import JobSpec, JobState, Running

EPOCH_SECONDS = 0.005
ADMIN = Principal(name="alice", role="admin")


def accuracy(spec: JobSpec, epoch: int) -> float:
    """Better near learning rate 1e-2, and with each epoch; a small network learns slower."""
    closeness = abs(math.log10(spec.train.learning_rate) + 2)  # 0 at 1e-2
    width = spec.train.layers[0].units
    return 0.9 - 0.05 * closeness + 0.004 * epoch + (0.0 if width >= 64 else -0.02)


class ScriptedRunner:
    """A run that reports an evaluated epoch every EPOCH_SECONDS, on a thread of its own."""

    def __init__(self, record, on_event, on_end, *, fail_if=None, epoch_seconds=EPOCH_SECONDS):
        self.record = record
        self.epoch_seconds = epoch_seconds
        self._on_event = on_event
        self._on_end = on_end
        self._stop: Stop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._fail = fail_if is not None and fail_if(record.spec)

    def start(self) -> None:
        self._thread.start()

    def stop(self, stop: Stop) -> None:
        self._stop = stop

    def request_stop(self, reason: str = "") -> None:
        self._stop = Stop(RunEnd.STOPPED, "the server shut down")

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        spec = self.record.spec
        self._on_event(Running(replicas=1))
        if self._fail:
            self._on_end(RunOutcome(RunEnd.FAILED, "the loss diverged"))
            return
        value = 0.0
        for epoch in range(1, spec.train.epochs + 1):
            time.sleep(self.epoch_seconds)
            if self._stop is not None:
                self._on_end(RunOutcome(self._stop.end, self._stop.reason))
                return
            value = accuracy(spec, epoch)
            self._on_event(
                EpochEnd(
                    epoch=epoch,
                    train_loss=1 - value,
                    train_accuracy=value,
                    eval_loss=1 - value,
                    eval_accuracy=value,
                    seconds=self.epoch_seconds,
                )
            )
        self._on_event(
            TrainingResult(
                train_loss=1 - value,
                train_accuracy=value,
                test_loss=1 - value,
                test_accuracy=value,
                steps=10,
                train_seconds=1.0,
                examples_per_second=1.0,
                has_model=True,
            )
        )
        self._on_end(RunOutcome(RunEnd.SUCCEEDED, ""))


class ScriptedRunners:
    def __init__(self, fail_if=None, epoch_seconds=EPOCH_SECONDS):
        self.fail_if = fail_if
        self.epoch_seconds = epoch_seconds
        self.runs: list[str] = []  # job ids, once per run

    def placement(self, record, assignment) -> Placement:
        return Placement("on the CPU", ("CPU",))

    def runner(self, record, assignment, on_event, on_end) -> ScriptedRunner:
        self.runs.append(record.job_id)
        return ScriptedRunner(
            record, on_event, on_end, fail_if=self.fail_if, epoch_seconds=self.epoch_seconds
        )

    def abandon(self, record) -> None:
        pass


class Service:
    """The job loop and the experiments' loop over one state directory, as a server has them."""

    def __init__(
        self, state_dir, *, max_cpu_jobs: int = 2, fail_if=None, epoch_seconds=EPOCH_SECONDS
    ):
        self.store = Store(state_dir)
        self.feed = JobFeed(self.store)
        self.registry = CollectorRegistry()
        self.metrics = ServiceMetrics(self.registry)
        self.runners = ScriptedRunners(fail_if, epoch_seconds)
        self.stopped = False
        # At each ask for warm workers: the jobs running, and how many workers.
        self.prewarmed_beside: list[tuple[list[str], int]] = []
        self.experiments = ExperimentManager(state_dir, metrics=self.metrics, pause_at="")
        self.controller = JobController(
            self.store,
            scheduler=Scheduler([], max_cpu_jobs=max_cpu_jobs),
            runners=self.runners,
            feed=self.feed,
            metrics=self.metrics,
            demand_of=self.demand_of,
            observers=(self.experiments,),
        )
        self.controller.start()
        self.experiments.start(self)

    # -- what the experiments' loop asks of the jobs' side (JobManager's answers) ----

    def demand_of(self, spec: JobSpec) -> Demand:
        return demand_for("cpu", 0, 0, batch_size=spec.train.batch_size)

    def submit(self, spec: JobSpec, request_id: str = "", *, principal: Principal):
        return self.controller.call(
            SubmitJob(spec, self.demand_of(spec), principal.name, request_id)
        )

    def prewarm(self, count: int = 1) -> None:
        running = self.store.list_jobs(states=(JobState.RUNNING,), limit=1000)[0]
        self.prewarmed_beside.append(([job.request_id for job in running], count))

    def check_spec(self, spec: JobSpec) -> None:
        try:
            spec.train.validate()
        except ValueError as error:
            raise InvalidArgument(str(error)) from None

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.experiments.stop()
        self.controller.shutdown(grace=5.0)
        self.store.close()

    def wait(self, experiment_id: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        for record in self.experiments.watch(experiment_id):
            if record.settled:
                return record
            assert time.monotonic() < deadline, record
        return self.experiments.get(experiment_id)

    def trial_jobs(self, experiment_id: str):
        jobs, _ = self.store.list_jobs(labels=(("experiment", experiment_id),), limit=1000)
        return jobs


@pytest.fixture
def start(tmp_path):
    """Starts a Service on the test's state directory (again: a restart); all stop at the end."""
    started: list[Service] = []

    def start_service(**options) -> Service:
        started.append(Service(tmp_path, **options))
        return started[-1]

    yield start_service
    for service in started:
        service.stop()


@pytest.fixture
def service(start):
    return start()


def experiment(**fields) -> ExperimentSpec:
    base = JobSpec(
        train=TrainConfig(epochs=9, learning_rate=1e-3), dataset="synthetic", strategy="cpu"
    )
    defaults = dict(
        base=base,
        parameters=(
            FloatParameter(name="learning_rate", low=1e-4, high=1e-1, log=True),
            IntParameter(name="layers[0].units", low=16, high=256, log=True),
            CategoricalParameter(name="optimizer", values=("adam", "rmsprop", "sgd")),
        ),
        searcher="random",
        max_trials=8,
        max_concurrent_trials=2,
        seed=7,
    )
    return ExperimentSpec(**{**defaults, **fields})


def test_random_search_runs_every_trial_as_a_labelled_job(service):
    record = service.experiments.submit(experiment(), "sweep-1", principal=ADMIN)
    done = service.wait(record.experiment_id)
    assert done.state is ExperimentState.SUCCEEDED, done.reason
    assert [trial.number for trial in done.trials] == list(range(8))
    assert all(trial.state is TrialState.SUCCEEDED for trial in done.trials)
    assert all(trial.epochs == 9 for trial in done.trials)
    jobs = service.trial_jobs(record.experiment_id)
    assert sorted(job.request_id for job in jobs) == sorted(
        f"{record.experiment_id}-trial-{n}" for n in range(8)
    )
    assert all(job.owner == "alice" and job.state is JobState.SUCCEEDED for job in jobs)
    best = max(done.trials, key=lambda trial: trial.metric or 0)
    assert done.best_trial == best.number
    # The same request_id answers with the same experiment.
    again = service.experiments.submit(experiment(), "sweep-1", principal=ADMIN)
    assert again.experiment_id == record.experiment_id


def test_a_running_trial_with_more_to_come_has_a_worker_warmed_beside_it(start):
    # Trials of 9 x 0.1 s: the experiments' loop sees each running, however busy the host.
    service = start(max_cpu_jobs=1, epoch_seconds=0.1)
    spec = experiment(max_trials=3, max_concurrent_trials=1)
    record = service.experiments.submit(spec, principal=ADMIN)
    done = service.wait(record.experiment_id)
    assert done.state is ExperimentState.SUCCEEDED, done.reason
    # Beside trial 0, two (trials 1 and 2 to come); beside trial 1, one; none beside
    # trial 2, the last; and as the experiment ends, back to the idle host's one.
    trial = f"{record.experiment_id}-trial-"
    assert service.prewarmed_beside == [([trial + "0"], 2), ([trial + "1"], 1), ([], 1)]


def test_successive_halving_stops_trials_at_a_rung(start):
    # Epochs long enough for the decision at a rung to come before the next epochs end.
    service = start(epoch_seconds=0.1)
    spec = experiment(early_stopping="successive_halving", min_epochs=1, reduction_factor=3)
    record = service.experiments.submit(spec, principal=ADMIN)
    done = service.wait(record.experiment_id)
    stopped = [trial for trial in done.trials if trial.state is TrialState.STOPPED_EARLY]
    assert stopped, [trial.state for trial in done.trials]
    assert all(trial.stopped_early_at in (1, 3) for trial in stopped)
    # A stopped job may finish the epoch it is in before it ends.
    assert all(trial.stopped_early_at <= trial.epochs < 9 for trial in stopped)
    assert sum(trial.epochs for trial in done.trials) < 8 * 9
    assert len(done.trials) == 8 and done.state is ExperimentState.SUCCEEDED
    for trial in stopped:
        assert service.feed.record(trial.job_id).state is JobState.CANCELED
    # The best trial is one that ran its nine epochs.
    assert done.trials[done.best_trial].epochs == 9


@pytest.mark.parametrize("pruner_kind", ["optuna", "patient"])
def test_no_trial_is_stopped_on_the_evidence_of_fewer_trials_than_the_reduction_factor(
    pruner_kind,
):
    import optuna

    from service.jobs.experiments import PatientHalvingPruner

    pruner_class = {
        "optuna": optuna.pruners.SuccessiveHalvingPruner,
        "patient": PatientHalvingPruner,
    }[pruner_kind]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        pruner=pruner_class(min_resource=1, reduction_factor=3, min_early_stopping_rate=0),
    )

    def stopped_after_epoch_1(accuracy: float) -> bool:
        trial = study.ask()
        trial.report(accuracy, 1)
        stop = trial.should_prune()
        if stop:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, 0.0)
        return stop

    # The second trial is behind the first at the rung: Optuna stops it for good.
    first, second = stopped_after_epoch_1(0.90), stopped_after_epoch_1(0.85)
    assert not first and second is (pruner_kind == "optuna")
    # From the third on, both keep only the best third of the trials at the rung.
    assert stopped_after_epoch_1(0.80)
    assert not stopped_after_epoch_1(0.95)


def test_a_grid_runs_each_point_once(service):
    spec = experiment(
        searcher="grid",
        max_trials=100,
        parameters=(
            CategoricalParameter(name="optimizer", values=("adam", "sgd")),
            FloatParameter(name="learning_rate", low=1e-3, high=1e-1, log=True, grid_points=3),
        ),
    )
    done = service.wait(service.experiments.submit(spec, principal=ADMIN).experiment_id)
    points = sorted(
        (dict(t.params)["optimizer"], dict(t.params)["learning_rate"]) for t in done.trials
    )
    assert len(points) == 6 == len(set(points))
    assert {round(math.log10(lr)) for _, lr in points} == {-3, -2, -1}


def test_tpe_reaches_a_target_and_cancels_the_rest(service):
    spec = experiment(searcher="tpe", max_trials=30, max_concurrent_trials=2, target=0.925)
    done = service.wait(service.experiments.submit(spec, principal=ADMIN).experiment_id)
    assert done.state is ExperimentState.SUCCEEDED
    assert "reached the target" in done.reason
    assert len(done.trials) < 30
    assert all(trial.state.finished for trial in done.trials)


def test_cancel_ends_the_experiment_and_its_running_trials(start):
    service = start(epoch_seconds=0.05)
    spec = experiment(base=JobSpec(train=TrainConfig(epochs=400), dataset="synthetic"))
    record = service.experiments.submit(spec, principal=ADMIN)
    deadline = time.monotonic() + 10
    while not any(
        t.state is TrialState.RUNNING for t in service.experiments.get(record.experiment_id).trials
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    canceled = service.experiments.cancel(record.experiment_id, principal=ADMIN)
    assert canceled.state is ExperimentState.CANCELED
    done = service.wait(record.experiment_id)
    assert {trial.state for trial in done.trials} == {TrialState.CANCELED}
    assert all(job.state is JobState.CANCELED for job in service.trial_jobs(record.experiment_id))
    with pytest.raises(FailedPrecondition):
        service.experiments.cancel(record.experiment_id, principal=ADMIN)


def test_a_watch_open_when_the_server_stops_ends_unavailable_to_reconnect(start):
    service = start(epoch_seconds=0.05)
    spec = experiment(base=JobSpec(train=TrainConfig(epochs=400), dataset="synthetic"))
    record = service.experiments.submit(spec, principal=ADMIN)
    watching = service.experiments.watch(record.experiment_id)
    assert next(watching).experiment_id == record.experiment_id
    service.experiments.stop()  # as the server's shutdown does, the experiment unsettled
    with pytest.raises(Unavailable, match="the experiment goes on when it is back"):
        for _ in watching:  # not an end, which a client would take for the experiment's
            pass


def test_too_many_failed_trials_fail_the_experiment(start):
    service = start(fail_if=lambda spec: spec.train.optimizer == "sgd")
    spec = experiment(
        parameters=(CategoricalParameter(name="optimizer", values=("sgd",)),),
        max_failed_trials=2,
        max_concurrent_trials=1,
    )
    done = service.wait(service.experiments.submit(spec, principal=ADMIN).experiment_id)
    assert done.state is ExperimentState.FAILED
    assert "3 trials failed" in done.reason
    assert [trial.state for trial in done.trials] == [TrialState.FAILED] * 3


def test_a_restart_goes_on_without_repeating_or_losing_a_trial(start):
    first = start()
    spec = experiment(base=JobSpec(train=TrainConfig(epochs=40), dataset="synthetic"))
    experiment_id = first.experiments.submit(spec, principal=ADMIN).experiment_id
    deadline = time.monotonic() + 20
    while len(first.experiments.get(experiment_id).trials) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.stop()
    second = start()
    done = second.wait(experiment_id)
    assert done.state is ExperimentState.SUCCEEDED
    assert [trial.number for trial in done.trials] == list(range(8))
    jobs = second.trial_jobs(experiment_id)
    assert len(jobs) == 8 == len({job.request_id for job in jobs})
    assert all(trial.state is TrialState.SUCCEEDED for trial in done.trials)


def test_metrics_count_trials_by_state_and_the_best_metric(service):
    done = service.wait(service.experiments.submit(experiment(), principal=ADMIN).experiment_id)
    # Settled: the series stay for the retention window.
    sample = service.registry.get_sample_value
    labels = {"experiment_id": done.experiment_id}
    assert sample("ntrain_experiment_trials", {**labels, "state": "succeeded"}) == 8
    best = done.trials[done.best_trial].metric
    assert sample("ntrain_experiment_best_metric", {**labels, "metric": "eval_accuracy"}) == best


def test_a_trial_spec_sets_the_parameters_and_labels():
    spec = experiment()
    job = trial_spec(
        spec,
        "exp-0123456789ab",
        3,
        {"learning_rate": 0.01, "layers[0].units": 64, "optimizer": "adam"},
    )
    assert job.train.learning_rate == 0.01 and job.train.optimizer == "adam"
    assert job.train.layers[0].units == 64 and job.train.layers[1].units == 10
    assert dict(job.labels) == {"experiment": "exp-0123456789ab", "trial": "3"}
    assert job.priority == -100  # low: trials give way to normal jobs
    assert job == trial_spec(
        spec,
        "exp-0123456789ab",
        3,
        {"learning_rate": 0.01, "layers[0].units": 64, "optimizer": "adam"},
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"parameters": ()}, "parameters"),
        ({"parameters": (CategoricalParameter(name="seed", values=("1",)),)}, "parameters[0].name"),
        ({"parameters": (CategoricalParameter(name="layers[1].units", values=("1",)),)},
         "parameters[0].name"),
        ({"parameters": (FloatParameter(name="learning_rate", low=0.0, high=1.0, log=True),)},
         "parameters[0].low"),
        ({"parameters": (IntParameter(name="learning_rate", low=1, high=2),)},
         "parameters[0].name"),
        ({"parameters": (CategoricalParameter(name="batch_size", values=("big",)),)},
         "parameters[0].values"),
        ({"searcher": "bayes"}, "searcher"),
        ({"metric": "accuracy"}, "metric"),
        ({"max_trials": 0}, "max_trials"),
        ({"early_stopping": "successive_halving", "reduction_factor": 1}, "reduction_factor"),
        ({"searcher": "grid"}, "parameters[0].grid_points"),
    ],
)  # fmt: skip
def test_an_invalid_spec_names_its_field(fields, field):
    with pytest.raises(InvalidArgument) as raised:
        check_experiment_spec(experiment(**fields))
    assert raised.value.field == field
