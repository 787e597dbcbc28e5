"""The control loop's decisions, against fakes: a fake clock, fake runners, an in-memory store.

No process, server or TensorFlow: the loop is driven by hand (`Harness.call`,
`process_pending`), runners are scripted (`FakeRunner.report`, `.end`), and
time moves only when a test moves it. Each test is one transition, recovery
or decision of the job state table (service/protocol.py `JobState`).
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from ntrain.v1 import training_pb2 as pb
from prometheus_client import CollectorRegistry

from naive_model.config import TrainConfig
from naive_model.results import CheckpointSaved, EpochEnd, Progress, TrainingResult
from service.jobs.controller import (
    PROGRESS_INTERVAL_SECONDS,
    SHUTDOWN,
    STARTUP_SECONDS,
    CancelJob,
    JobController,
    Placement,
    StopAdmitting,
    StopRuns,
    SubmitJob,
    WorkerReported,
)
from service.jobs.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from service.jobs.feed import JobFeed
from service.jobs.runner import CANCEL, RunEnd, RunnerThread, RunOutcome, Stop
from service.jobs.scheduler import Demand, Scheduler, demand_for
from service.jobs.store import JobRecord, Store
from service.metrics import ServiceMetrics
from service.protocol import TERMINAL_STATES, Heartbeat, JobSpec, JobState, Running, StateChange

QUEUED, STARTING, RUNNING = JobState.QUEUED, JobState.STARTING, JobState.RUNNING
CANCELLING, SUCCEEDED = JobState.CANCELLING, JobState.SUCCEEDED
FAILED, CANCELED = JobState.FAILED, JobState.CANCELED

RESULT = TrainingResult(
    train_loss=0.1,
    train_accuracy=0.97,
    test_loss=0.1,
    test_accuracy=0.96,
    steps=10,
    train_seconds=1.0,
    examples_per_second=1000.0,
    has_model=True,
)


def spec(strategy: str = "cpu", **fields) -> JobSpec:
    return JobSpec(train=TrainConfig(epochs=2), dataset="synthetic", strategy=strategy, **fields)


def progress(step: int, epoch: int = 1) -> Progress:
    return Progress(
        epoch=epoch,
        epochs=2,
        step=step,
        steps_per_epoch=5,
        step_in_epoch=step,
        loss=0.5,
        accuracy=0.8,
        examples_per_second=1000.0,
        examples=step * 128,
    )


def epoch_end(epoch: int) -> EpochEnd:
    return EpochEnd(
        epoch=epoch,
        train_loss=0.4,
        train_accuracy=0.9,
        eval_loss=0.3,
        eval_accuracy=0.91,
        seconds=1.0,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRunner:
    """A runner the test scripts: what it reports, and how its run ends."""

    def __init__(self, job_id, on_event, on_end):
        self.job_id = job_id
        self._on_event = on_event
        self._on_end = on_end
        self.started = False
        self.alive = False
        self.stops: list[Stop] = []
        self.stop_requests = 0
        self.stop_reasons: list[str] = []

    def start(self) -> None:
        self.started = self.alive = True

    def stop(self, stop: Stop) -> None:
        self.stops.append(stop)

    def request_stop(self, reason: str = "") -> None:
        self.stop_requests += 1
        self.stop_reasons.append(reason)

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return self.alive

    def report(self, *events) -> None:
        for event in events:
            self._on_event(event)

    def end(self, end: RunEnd, reason: str = "") -> None:
        self.alive = False
        self._on_end(RunOutcome(end, reason))


class FakeRunners:
    """The runner factory: one `FakeRunner` per run, kept per job."""

    def __init__(self) -> None:
        self.made: dict[str, list[FakeRunner]] = {}
        self.abandoned: list[str] = []

    def placement(self, record, assignment) -> Placement:
        devices = tuple(f"GPU:{index}" for index in assignment.gpus) or ("CPU",)
        return Placement(f"on {', '.join(devices)}", devices)

    def runner(self, record, assignment, on_event, on_end) -> FakeRunner:
        runner = FakeRunner(record.job_id, on_event, on_end)
        self.made.setdefault(record.job_id, []).append(runner)
        return runner

    def abandon(self, record) -> None:
        self.abandoned.append(record.job_id)


class Harness:
    """A controller over an in-memory store, as a server would build it, with fakes."""

    def __init__(
        self,
        tmp_path,
        *,
        gpus: int = 0,
        store: Store | None = None,
        observers=(),
        progress_interval_seconds: float = PROGRESS_INTERVAL_SECONDS,
        **scheduling,
    ):
        self.clock = FakeClock()
        self.store = store or Store(tmp_path, in_memory=True)
        self.gpus = gpus
        self.registry = CollectorRegistry()
        self.metrics = ServiceMetrics(self.registry)
        self.runners = FakeRunners()
        self.idle_calls = 0
        self.feed = JobFeed(self.store)
        self.controller = JobController(
            self.store,
            scheduler=Scheduler(list(range(gpus)), clock=self.clock.monotonic, **scheduling),
            runners=self.runners,
            feed=self.feed,
            metrics=self.metrics,
            demand_of=self.demand_of,
            clock=self.clock,
            on_idle=self._idle,
            observers=observers,
            progress_interval_seconds=progress_interval_seconds,
        )

    def _idle(self) -> None:
        self.idle_calls += 1

    def demand_of(self, job: JobSpec) -> Demand:
        return demand_for(
            job.strategy, job.device_count, self.gpus, batch_size=128, hosts=job.hosts
        )

    def submit(self, job: JobSpec | None = None, *, owner: str = "alice", request_id: str = ""):
        job = job or spec()
        message = SubmitJob(job, self.demand_of(job), owner, request_id)
        return self.controller.call(message)

    def record(self, job_id: str) -> JobRecord:
        return self.feed.record(job_id)

    def states(self, job_id: str) -> list[JobState]:
        return [t.state for t in self.record(job_id).transitions]

    def runner(self, job_id: str) -> FakeRunner:
        return self.runners.made[job_id][-1]

    def settle(self) -> None:
        """Handle what the fake runners posted."""
        self.controller.process_pending()

    def sample(self, name: str, **labels) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def running(self, job_id: str, *events) -> FakeRunner:
        """Drive a started job to RUNNING (and through `events`)."""
        runner = self.runner(job_id)
        runner.report(Running(replicas=1), *events)
        self.settle()
        return runner

    def restarted(self, tmp_path, **scheduling) -> Harness:
        """A new controller over the same store: the server after a restart."""
        return Harness(tmp_path, gpus=self.gpus, store=self.store, **scheduling)


@pytest.fixture
def loop(tmp_path) -> Harness:
    return Harness(tmp_path)


# -- the states ---------------------------------------------------------------------------


def test_job_states_are_the_contracts_names_and_numbers():
    contract = {
        name.removeprefix("JOB_STATE_"): number
        for name, number in pb.JobState.items()
        if name != "JOB_STATE_UNSPECIFIED"
    }
    assert {state.name: state.value for state in JobState} == contract
    assert {state for state in JobState if state.finished} == TERMINAL_STATES


# -- submit, start, run, succeed ------------------------------------------------------------


def test_a_submitted_job_starts_on_the_free_cpu_slot(loop):
    job = loop.submit()
    assert job.state is STARTING and job.owner == "alice"
    assert loop.states(job.job_id) == [QUEUED, STARTING]
    assert job.devices == ("CPU",) and job.strategy == "cpu"
    assert loop.runner(job.job_id).started


def test_the_workers_running_event_makes_the_job_running(loop):
    job = loop.submit()
    loop.running(job.job_id)
    record = loop.record(job.job_id)
    assert record.state is RUNNING and record.transitions[-1].reason == "1 replica(s)"


def test_progress_epochs_and_the_result_are_stored_in_order_then_the_job_succeeds(loop):
    job = loop.submit()
    runner = loop.running(job.job_id, progress(1), epoch_end(1), progress(6, 2), RESULT)
    runner.end(RunEnd.SUCCEEDED)
    loop.settle()
    events = loop.store.events_after(job.job_id, 0)
    payloads = [e.payload for e in events if not isinstance(e.payload, StateChange)]
    assert payloads == [progress(1), epoch_end(1), progress(6, 2), RESULT]
    record = loop.record(job.job_id)
    assert record.state is SUCCEEDED and record.result == RESULT
    assert record.progress == progress(6, 2)
    assert loop.sample("ntrain_jobs_finished_total", outcome="succeeded") == 1
    assert loop.sample("ntrain_jobs", state="SUCCEEDED") == 1


def test_a_second_job_waits_for_the_cpu_slot_and_starts_when_it_frees(loop):
    first, second = loop.submit(), loop.submit()
    assert second.state is QUEUED and second.job_id not in loop.runners.made
    assert loop.sample("ntrain_queue_length") == 1
    loop.runner(first.job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    assert loop.record(second.job_id).state is STARTING
    assert loop.runner(second.job_id).started


def test_the_first_progress_is_timed_from_submission_once(loop):
    job = loop.submit()
    loop.clock.advance(7.0)
    loop.running(job.job_id, progress(1), progress(2))
    assert loop.sample("ntrain_submit_to_first_step_seconds_count") == 1
    assert loop.sample("ntrain_submit_to_first_step_seconds_sum") == 7.0


def test_a_checkpoint_is_remembered_without_an_event(loop):
    job = loop.submit()
    loop.running(job.job_id)
    before = loop.record(job.job_id).last_sequence
    saved = CheckpointSaved(path="/c/ckpt-1", epoch=1, step=5, seconds=0.1)
    loop.running(job.job_id, saved)
    record = loop.record(job.job_id)
    assert record.checkpoint == saved and record.last_sequence == before


def test_gpu_jobs_get_disjoint_gpus_and_the_third_waits(tmp_path):
    loop = Harness(tmp_path, gpus=2)
    jobs = [loop.submit(spec("gpu")) for _ in range(3)]
    assert [j.state for j in jobs] == [STARTING, STARTING, QUEUED]
    assert {jobs[0].devices, jobs[1].devices} == {("GPU:0",), ("GPU:1",)}
    loop.runner(jobs[1].job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    assert loop.record(jobs[2].job_id).devices == jobs[1].devices


def test_an_auto_job_takes_the_cpu_once_its_wait_for_a_gpu_ends(tmp_path):
    loop = Harness(tmp_path, gpus=1, auto_gpu_wait_seconds=60.0)
    holder = loop.submit(spec("gpu"))
    waiting = loop.submit(spec("auto"))
    assert waiting.state is QUEUED
    assert loop.controller._seconds_to_next_deadline() == 60.0  # the loop wakes by itself
    loop.clock.advance(60.0)
    loop.controller.tick()
    record = loop.record(waiting.job_id)
    assert record.state is STARTING and record.strategy == "cpu"
    assert loop.record(holder.job_id).state is STARTING


def test_the_warm_pool_is_filled_only_when_nothing_runs_or_waits(loop):
    loop.controller.recover()
    assert loop.idle_calls == 1
    job = loop.submit()
    assert loop.idle_calls == 1
    loop.runner(job.job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    assert loop.idle_calls == 2


# -- failures, worker deaths and restarts -----------------------------------------------------


def test_a_diverged_loss_fails_the_job_without_a_restart(loop):
    job = loop.submit()
    loop.running(job.job_id, progress(1))
    loop.runner(job.job_id).end(RunEnd.FAILED, "the loss became nan in epoch 1")
    loop.settle()
    record = loop.record(job.job_id)
    assert record.state is FAILED and record.restarts == 0
    assert record.failure_reason == "the loss became nan in epoch 1"
    assert len(loop.runners.made[job.job_id]) == 1
    assert loop.sample("ntrain_jobs_finished_total", outcome="failed") == 1


def test_a_dead_worker_with_restarts_left_is_queued_again_and_restarted(loop):
    job = loop.submit(spec(max_restarts=2))
    loop.running(job.job_id)
    loop.runner(job.job_id).end(RunEnd.WORKER_DIED, "the worker process was killed by SIGKILL")
    loop.settle()
    record = loop.record(job.job_id)
    assert record.restarts == 1 and record.state is STARTING
    assert loop.states(job.job_id) == [QUEUED, STARTING, RUNNING, QUEUED, STARTING]
    requeued = record.transitions[3].reason
    assert requeued == (
        "the worker process was killed by SIGKILL; restart 1 of 2, "
        "from the start (no checkpoint yet)"
    )
    assert len(loop.runners.made[job.job_id]) == 2


def test_a_restart_resumes_from_the_newest_checkpoint(loop):
    job = loop.submit()
    saved = CheckpointSaved(path="/c", epoch=1, step=7, seconds=0.1, step_in_epoch=2)
    loop.running(job.job_id, saved)
    loop.runner(job.job_id).end(RunEnd.WORKER_DIED, "killed")
    loop.settle()
    assert loop.record(job.job_id).transitions[3].reason.endswith("from epoch 2, step 2 of it")


def test_a_dead_worker_with_no_restart_left_fails_the_job_in_one_line(loop):
    job = loop.submit(spec(max_restarts=1))
    for _ in range(2):
        loop.running(job.job_id)
        loop.runner(job.job_id).end(RunEnd.WORKER_DIED, "killed by SIGKILL")
        loop.settle()
    record = loop.record(job.job_id)
    assert record.state is FAILED
    assert record.failure_reason == "killed by SIGKILL (after 1 restarts)"


def test_a_job_without_restarts_fails_at_its_workers_first_death(loop):
    job = loop.submit(spec(max_restarts=0))
    loop.runner(job.job_id).end(RunEnd.WORKER_DIED, "the worker process exited with code 1")
    loop.settle()
    assert loop.record(job.job_id).state is FAILED
    assert loop.record(job.job_id).failure_reason == "the worker process exited with code 1"


def test_a_job_that_ends_keeps_no_half_written_checkpoint(loop):
    job = loop.submit(spec(max_restarts=0))
    checkpoints = loop.store.job_files(job.job_id).checkpoints
    checkpoints.mkdir(parents=True)
    (checkpoints / "ckpt-2.index").write_bytes(b"kept")  # a whole checkpoint
    (checkpoints / "ckpt-3_temp_9f1c" / "part-00000-of-00001").mkdir(parents=True)
    (checkpoints / "checkpoint.tmp4e2a").write_bytes(b"")  # its list, half-renamed
    loop.runner(job.job_id).end(RunEnd.WORKER_DIED, "killed by SIGKILL mid-save")
    loop.settle()
    assert loop.record(job.job_id).state is FAILED
    assert sorted(path.name for path in checkpoints.iterdir()) == ["ckpt-2.index"]


def test_a_run_stopped_outside_a_shutdown_is_queued_again_to_resume(loop):
    job = loop.submit()
    loop.running(job.job_id, CheckpointSaved(path="/c", epoch=1, step=5, seconds=0.1))
    loop.runner(job.job_id).end(RunEnd.STOPPED, "stopped in epoch 2 at global step 5")
    loop.settle()
    record = loop.record(job.job_id)
    assert record.transitions[3].state is QUEUED and record.restarts == 0
    assert (
        record.transitions[3].reason == "stopped in epoch 2 at global step 5; resumes from epoch 1"
    )


def test_an_event_of_a_job_that_has_no_run_is_ignored(loop):
    job = loop.submit()
    loop.runner(job.job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    loop.controller.call(WorkerReported(job.job_id, progress(3)))
    assert loop.record(job.job_id).state is SUCCEEDED
    assert loop.record(job.job_id).progress is None


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_of_a_queued_job_ends_it_at_once(loop):
    loop.submit()
    queued = loop.submit()
    record = loop.controller.call(CancelJob(queued.job_id))
    assert record.state is CANCELED and record.transitions[-1].reason == "canceled while queued"
    assert loop.controller.snapshot.queue_length == 0
    assert loop.sample("ntrain_jobs_finished_total", outcome="canceled") == 1


@pytest.mark.parametrize("started", [False, True], ids=["starting", "running"])
def test_cancel_of_a_started_job_stops_its_run_then_cancels_it(loop, started):
    job = loop.submit()
    if started:
        loop.running(job.job_id)
    record = loop.controller.call(CancelJob(job.job_id))
    assert record.state is CANCELLING
    runner = loop.runner(job.job_id)
    assert runner.stops == [CANCEL]
    runner.end(RunEnd.CANCELED, "canceled")
    loop.settle()
    assert loop.record(job.job_id).state is CANCELED
    assert loop.controller.snapshot.running == {}


def test_a_second_cancel_while_cancelling_adds_no_transition(loop):
    job = loop.submit()
    loop.controller.call(CancelJob(job.job_id))
    loop.controller.call(CancelJob(job.job_id))
    assert loop.states(job.job_id).count(CANCELLING) == 1


def test_a_running_event_after_a_cancel_does_not_undo_it(loop):
    job = loop.submit()
    loop.controller.call(CancelJob(job.job_id))
    loop.running(job.job_id)
    assert loop.record(job.job_id).state is CANCELLING


def test_a_result_that_came_in_before_the_cancel_stands(loop):
    job = loop.submit()
    runner = loop.running(job.job_id, RESULT)
    loop.controller.call(CancelJob(job.job_id))
    runner.end(RunEnd.SUCCEEDED)
    loop.settle()
    assert loop.record(job.job_id).state is SUCCEEDED


@pytest.mark.parametrize("end", [RunEnd.SUCCEEDED, RunEnd.FAILED, RunEnd.CANCELED])
def test_cancel_of_an_ended_job_is_refused(loop, end):
    job = loop.submit()
    loop.runner(job.job_id).end(end, "reason")
    loop.settle()
    with pytest.raises(FailedPrecondition, match="already ended"):
        loop.controller.call(CancelJob(job.job_id))


def test_cancel_of_an_unknown_job_is_not_found(loop):
    with pytest.raises(NotFound):
        loop.controller.call(CancelJob("job-nope"))


# -- max runtime ------------------------------------------------------------------------------


def test_a_run_past_its_max_runtime_is_stopped_and_the_job_fails(loop):
    job = loop.submit(spec(max_runtime_seconds=5.0))
    runner = loop.running(job.job_id)
    assert loop.controller._seconds_to_next_deadline() == 5.0
    loop.clock.advance(4.9)
    loop.controller.tick()
    assert runner.stops == []
    loop.clock.advance(0.1)
    loop.controller.tick()
    reason = "the job ran past its max_runtime_seconds of 5"
    assert runner.stops == [Stop(RunEnd.FAILED, reason)]
    runner.end(RunEnd.FAILED, reason)
    loop.settle()
    assert loop.record(job.job_id).failure_reason == reason


def test_a_restarted_run_gets_a_fresh_max_runtime(loop):
    job = loop.submit(spec(max_runtime_seconds=5.0))
    loop.clock.advance(4.0)
    loop.runner(job.job_id).end(RunEnd.WORKER_DIED, "killed")
    loop.settle()
    loop.clock.advance(4.0)
    loop.controller.tick()
    assert loop.runner(job.job_id).stops == []


# -- submissions: request ids, admission -------------------------------------------------------


def test_the_same_request_id_and_spec_names_the_same_job(loop):
    first = loop.submit(request_id="r-1")
    again = loop.submit(request_id="r-1")
    assert again.job_id == first.job_id
    assert len(loop.store.list_jobs()[0]) == 1


def test_the_same_request_id_with_another_spec_is_refused(loop):
    loop.submit(request_id="r-1")
    with pytest.raises(AlreadyExists, match="r-1"):
        loop.submit(spec(max_restarts=0), request_id="r-1")


def test_request_ids_are_each_owners_own(loop):
    mine = loop.submit(request_id="r-1", owner="alice")
    theirs = loop.submit(request_id="r-1", owner="bob")
    assert mine.job_id != theirs.job_id


def test_a_full_queue_refuses_a_submission(tmp_path):
    loop = Harness(tmp_path, max_queue=1)
    loop.submit()  # runs
    loop.submit()  # waits
    with pytest.raises(ResourceExhausted, match="queue is full"):
        loop.submit()
    assert len(loop.store.list_jobs()[0]) == 2


# -- shutdown -------------------------------------------------------------------------------


def test_shutdown_asks_runs_to_checkpoint_and_leaves_their_jobs_to_resume(loop):
    running, queued = loop.submit(), loop.submit()
    runner = loop.running(running.job_id)
    runners = loop.controller.call(StopAdmitting())
    assert runners == [runner] and runner.stop_requests == 1
    runner.end(RunEnd.STOPPED, "stopped in epoch 1 at global step 3")
    loop.settle()
    assert loop.record(running.job_id).state is RUNNING
    assert loop.record(queued.job_id).state is QUEUED  # nothing dispatched once closed
    with pytest.raises(Unavailable):
        loop.submit()


def test_shutdown_kills_runs_that_outlast_the_grace_and_they_still_resume(loop):
    job = loop.submit()
    runner = loop.running(job.job_id)
    loop.controller.call(StopAdmitting())
    loop.controller.call(StopRuns())
    assert runner.stops == [SHUTDOWN]
    runner.end(SHUTDOWN.end, SHUTDOWN.reason)
    loop.settle()
    assert loop.record(job.job_id).state is RUNNING


def test_the_whole_shutdown_ends_with_a_closed_snapshot(loop):
    loop.submit()
    loop.controller.shutdown(grace=0.0)
    assert loop.controller.snapshot.closed and loop.controller.snapshot.running == {}


# -- restart recovery -------------------------------------------------------------------------


def test_recovery_dispatches_a_queued_job_without_queueing_it_twice(loop, tmp_path):
    loop.submit()
    queued = loop.submit()
    after = loop.restarted(tmp_path, max_cpu_jobs=2)
    after.controller.recover()
    assert after.states(queued.job_id) == [QUEUED, STARTING]


@pytest.mark.parametrize("state", [STARTING, RUNNING])
def test_recovery_resumes_a_started_job_from_its_checkpoint(loop, tmp_path, state):
    job = loop.submit()
    if state is RUNNING:
        saved = CheckpointSaved(path="/c", epoch=1, step=9, seconds=0.1, step_in_epoch=4)
        loop.running(job.job_id, saved)
    after = loop.restarted(tmp_path)
    after.controller.recover()
    record = after.record(job.job_id)
    assert record.state is STARTING and record.restarts == 0
    where = (
        "from epoch 2, step 4 of it" if state is RUNNING else "from the start (no checkpoint yet)"
    )
    assert record.transitions[-2].reason == f"resumed {where} after a server restart"


def test_recovery_ends_a_cancelling_job_canceled_and_abandons_its_work(loop, tmp_path):
    job = loop.submit()
    loop.controller.call(CancelJob(job.job_id))
    after = loop.restarted(tmp_path)
    after.controller.recover()
    record = after.record(job.job_id)
    assert record.state is CANCELED
    assert record.transitions[-1].reason == "the server stopped while cancelling"
    assert after.runners.abandoned == [job.job_id]


@pytest.mark.parametrize("end", [RunEnd.SUCCEEDED, RunEnd.FAILED, RunEnd.CANCELED])
def test_recovery_leaves_ended_jobs_alone(loop, tmp_path, end):
    job = loop.submit()
    loop.runner(job.job_id).end(end, "reason")
    loop.settle()
    before = loop.record(job.job_id)
    after = loop.restarted(tmp_path)
    after.controller.recover()
    assert after.record(job.job_id) == before and after.runners.made == {}


def test_recovery_follows_a_multi_worker_job_again_without_a_new_start(loop, tmp_path):
    job = loop.submit(spec("multi_worker", hosts=2))
    loop.running(job.job_id)
    after = loop.restarted(tmp_path)
    after.controller.recover()
    assert after.record(job.job_id).state is RUNNING
    assert after.states(job.job_id) == [QUEUED, STARTING, RUNNING]
    assert after.runner(job.job_id).started


def test_recovery_fails_a_job_the_host_can_no_longer_run(tmp_path):
    loop = Harness(tmp_path, gpus=2)
    loop.submit(spec("gpu"))
    loop.submit(spec("gpu"))
    waiting = loop.submit(spec("mirrored", device_count=2))
    after = Harness(tmp_path, gpus=1, store=loop.store)  # a GPU is gone
    after.controller.recover()
    record = after.record(waiting.job_id)
    assert record.state is FAILED
    assert record.failure_reason.startswith("cannot run on this host: ")


# -- observers ---------------------------------------------------------------------------------


class Recorder:
    def __init__(self, fail: bool = False):
        self.seen: list[tuple[str, JobState, type]] = []
        self.fail = fail

    def job_event(self, record, event) -> None:
        self.seen.append((record.job_id, record.state, type(event.payload)))
        if self.fail:
            raise RuntimeError("an observer's bug")


def test_observers_see_every_stored_event_in_order_with_the_record_after_it(tmp_path):
    recorder, failing = Recorder(), Recorder(fail=True)
    loop = Harness(tmp_path, observers=(failing, recorder))
    job = loop.submit()
    loop.running(job.job_id, progress(1), epoch_end(1), RESULT)
    loop.runner(job.job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    assert [(state, kind) for _, state, kind in recorder.seen] == [
        (QUEUED, StateChange),
        (STARTING, StateChange),
        (RUNNING, StateChange),
        (RUNNING, Progress),
        (RUNNING, EpochEnd),
        (RUNNING, TrainingResult),
        (SUCCEEDED, StateChange),
    ]
    assert failing.seen == recorder.seen  # its failures stopped nothing


# -- the loop on its own thread, and the shared runner plumbing --------------------------------


def test_the_loop_thread_handles_runner_messages_in_order(loop):
    loop.controller.start()
    try:
        job = loop.submit()
        runner = loop.runner(job.job_id)
        runner.report(Running(replicas=1), progress(1), RESULT)
        runner.end(RunEnd.SUCCEEDED)
        seen = loop.record(job.job_id).last_sequence
        while not loop.record(job.job_id).finished:
            loop.feed.wait_for_change(job.job_id, seen, 5.0)
            seen = loop.record(job.job_id).last_sequence
        assert loop.states(job.job_id) == [QUEUED, STARTING, RUNNING, SUCCEEDED]
    finally:
        loop.controller.shutdown(grace=0.0)


class ScriptedRun(RunnerThread):
    """A RunnerThread whose work ends as the test says."""

    def __init__(self, outcome: RunOutcome | Exception):
        self.ended: list[RunOutcome] = []
        super().__init__("job-x", on_event=lambda event: None, on_end=self.ended.append, kind="t")
        self.outcome = outcome
        self.release = threading.Event()

    def _follow(self) -> RunOutcome:
        self.release.wait(5.0)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def _end_now(self) -> None:
        self.release.set()

    def _ask_to_stop(self) -> None:
        self.release.set()


@pytest.mark.parametrize(
    "outcome, stop, reported",
    [
        (RunOutcome(RunEnd.WORKER_DIED, "killed"), CANCEL, RunOutcome(RunEnd.CANCELED, "canceled")),
        (RunOutcome(RunEnd.SUCCEEDED), CANCEL, RunOutcome(RunEnd.SUCCEEDED)),
        (
            RunOutcome(RunEnd.WORKER_DIED, "x"),
            SHUTDOWN,
            RunOutcome(RunEnd.STOPPED, SHUTDOWN.reason),
        ),
        (RunOutcome(RunEnd.FAILED, "nan"), None, RunOutcome(RunEnd.FAILED, "nan")),
        (RuntimeError("bug"), None, RunOutcome(RunEnd.FAILED, "internal error: bug")),
    ],
    ids=["stop-wins", "result-stands", "shutdown", "own-end", "bug"],
)
def test_a_runner_thread_reports_one_outcome_with_its_stop_applied(outcome, stop, reported):
    run = ScriptedRun(outcome)
    run.start()
    if stop is not None:
        run.stop(stop)
    else:
        run.release.set()
    run.join(5.0)
    assert run.ended == [reported]


# -- priority and preemption (a faked 8-GPU host where GPUs matter) ------------------------------

LOW, NORMAL, HIGH = -100, 0, 100


def test_the_queue_runs_the_most_urgent_job_first_then_the_oldest(loop):
    loop.submit()  # holds the CPU slot
    old_low = loop.submit(spec(priority=LOW))
    normal = loop.submit(spec(priority=NORMAL))
    assert loop.controller.scheduler.waiting == [normal.job_id, old_low.job_id]


def test_an_urgent_cpu_job_preempts_the_running_one_which_resumes_where_it_stood(loop):
    low = loop.submit(spec(priority=LOW))
    saved = CheckpointSaved(path="/c", epoch=1, step=4, seconds=0.1, step_in_epoch=4)
    victim = loop.running(low.job_id, progress(4), saved)
    high = loop.submit(spec(priority=HIGH))
    assert high.state is QUEUED and victim.stop_requests == 1 and victim.stops == []
    assert victim.stop_reasons == [f"preempted by {high.job_id}"]  # for the victim's own log
    victim.end(RunEnd.STOPPED, "stopped in epoch 1 at global step 4")
    loop.settle()
    assert loop.record(high.job_id).state is STARTING
    record = loop.record(low.job_id)
    assert record.state is QUEUED and record.preemptions == 1 and record.restarts == 0
    assert record.transitions[-1].reason == (
        f"preempted by {high.job_id} (preemption 1); stopped in epoch 1 at global step 4; "
        "resumes from epoch 2, step 4 of it"
    )
    assert loop.sample("ntrain_job_preemptions_total", job_id=low.job_id, strategy="cpu") == 1
    loop.runner(high.job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    assert loop.record(low.job_id).state is STARTING  # resumed from its checkpoint


def test_a_preempted_job_goes_back_ahead_of_the_others_of_its_priority(loop):
    low = loop.submit(spec(priority=LOW))
    waiting_low = loop.submit(spec(priority=LOW))
    high = loop.submit(spec(priority=HIGH))
    loop.runner(low.job_id).end(RunEnd.STOPPED, "stopped")
    loop.settle()
    assert loop.controller.scheduler.waiting == [low.job_id, waiting_low.job_id]
    assert loop.record(high.job_id).state is STARTING


@pytest.mark.parametrize("priority", [NORMAL, LOW], ids=["equal", "lower"])
def test_no_preemption_by_an_equal_or_lower_priority(loop, priority):
    running = loop.submit(spec(priority=NORMAL))
    loop.submit(spec(priority=priority))
    assert loop.runner(running.job_id).stop_requests == 0


def gpu_job(priority: int, gpus: int = 1) -> JobSpec:
    return spec("mirrored" if gpus > 1 else "gpu", priority=priority, device_count=gpus)


def fill(loop: Harness, *jobs: JobSpec) -> list[JobRecord]:
    records = [loop.submit(job) for job in jobs]
    assert all(record.state is STARTING for record in records)
    return records


def victims(loop: Harness, records: list[JobRecord]) -> list[int]:
    """Which of `records` were asked to stop, by position."""
    return [i for i, r in enumerate(records) if loop.runner(r.job_id).stop_requests]


def test_the_victim_is_the_lowest_priority_first(tmp_path):
    loop = Harness(tmp_path, gpus=8)
    running = fill(loop, *[gpu_job(NORMAL)] * 7, gpu_job(LOW))
    loop.submit(gpu_job(HIGH))
    assert victims(loop, running) == [7]


def test_among_equals_the_victim_is_the_one_that_loses_the_least_work(tmp_path):
    loop = Harness(tmp_path, gpus=8)
    running = fill(loop, *[gpu_job(LOW)] * 8)
    for index, record in enumerate(running):
        saved = CheckpointSaved(path="/c", epoch=1, step=10, seconds=0.1)
        loop.running(record.job_id, saved, progress(10 + (3 if index == 5 else 20)))
    loop.submit(gpu_job(HIGH))
    assert victims(loop, running) == [5]


def test_among_equals_losing_as_much_the_victim_is_the_newest(tmp_path):
    loop = Harness(tmp_path, gpus=8)
    running = []
    for _ in range(8):
        running += fill(loop, gpu_job(LOW))
        loop.clock.advance(1.0)
    loop.submit(gpu_job(HIGH))
    assert victims(loop, running) == [7]


def test_the_fewest_victims_that_free_enough(tmp_path):
    loop = Harness(tmp_path, gpus=8)
    # Four one-GPU jobs, then one of four GPUs: all alike but for their size.
    running = fill(loop, *[gpu_job(LOW)] * 4, gpu_job(LOW, gpus=4))
    loop.submit(gpu_job(HIGH, gpus=4))
    assert victims(loop, running) == [4]


def test_lower_priorities_are_drawn_on_before_fewer_victims(tmp_path):
    loop = Harness(tmp_path, gpus=8)
    # Four one-GPU jobs of the lowest priority, and one of four GPUs just above them.
    running = fill(loop, *[gpu_job(LOW - 1)] * 4, gpu_job(LOW, gpus=4))
    loop.submit(gpu_job(HIGH, gpus=4))
    assert victims(loop, running) == [0, 1, 2, 3]


def test_two_victims_when_one_is_not_enough(tmp_path):
    loop = Harness(tmp_path, gpus=8)
    running = fill(loop, *[gpu_job(NORMAL, gpus=2)] * 3, gpu_job(LOW), gpu_job(LOW))
    assert loop.controller.scheduler.free_gpus == ()
    loop.submit(gpu_job(HIGH, gpus=3))  # both LOW jobs free 2: one NORMAL job too
    assert victims(loop, running) == [0, 3]


def test_no_victims_when_stopping_every_lower_job_frees_too_little(tmp_path):
    loop = Harness(tmp_path, gpus=8)
    running = fill(loop, *[gpu_job(HIGH, gpus=2)] * 3, gpu_job(LOW, gpus=2))
    loop.submit(gpu_job(HIGH, gpus=4))
    assert victims(loop, running) == []


def test_a_job_waiting_for_its_victims_keeps_freed_gpus_from_jobs_behind_it(tmp_path):
    loop = Harness(tmp_path, gpus=8)
    running = fill(loop, *[gpu_job(NORMAL)] * 6, gpu_job(LOW, gpus=2))
    urgent = loop.submit(gpu_job(HIGH, gpus=2))
    assert victims(loop, running) == [6]
    behind = loop.submit(gpu_job(NORMAL))
    loop.runner(running[0].job_id).end(RunEnd.SUCCEEDED)  # a GPU frees on its own
    loop.settle()
    assert loop.record(behind.job_id).state is QUEUED  # held for the urgent job
    loop.runner(running[6].job_id).end(RunEnd.STOPPED, "stopped")
    loop.settle()
    assert loop.record(urgent.job_id).state is STARTING
    assert loop.record(behind.job_id).state is STARTING  # on the GPU that freed first


def test_backfill_still_lets_a_small_job_pass_a_waiting_big_one(tmp_path):
    loop = Harness(tmp_path, gpus=8, backfill_seconds=600.0)
    fill(loop, *[gpu_job(NORMAL)] * 6)
    big = loop.submit(gpu_job(NORMAL, gpus=4))
    small = loop.submit(gpu_job(NORMAL))
    assert loop.record(big.job_id).state is QUEUED
    assert loop.record(small.job_id).state is STARTING


def test_a_resumed_job_is_not_preempted_again_before_its_minimum_run(tmp_path):
    loop = Harness(tmp_path)
    loop.controller._min_run = 100.0
    low = loop.submit(spec(priority=LOW))
    first = loop.submit(spec(priority=HIGH))
    loop.runner(low.job_id).end(RunEnd.STOPPED, "stopped")
    loop.settle()
    loop.runner(first.job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    resumed = loop.runner(low.job_id)
    second = loop.submit(spec(priority=HIGH))
    assert resumed.stop_requests == 0 and loop.record(second.job_id).state is QUEUED
    assert loop.controller._seconds_to_next_deadline() == 100.0
    loop.clock.advance(100.0)
    loop.controller.tick()
    assert resumed.stop_requests == 1


def test_a_victim_that_outlasts_the_grace_is_killed_and_resumes_from_its_checkpoint(tmp_path):
    loop = Harness(tmp_path)
    loop.controller._preemption_grace = 30.0
    low = loop.submit(spec(priority=LOW))
    victim = loop.running(low.job_id, CheckpointSaved(path="/c", epoch=1, step=5, seconds=0.1))
    loop.submit(spec(priority=HIGH))
    loop.clock.advance(30.0)
    loop.controller.tick()
    (stop,) = victim.stops
    assert stop.end is RunEnd.STOPPED and "preemption grace of 30 s" in stop.reason
    victim.end(stop.end, stop.reason)
    loop.settle()
    record = loop.record(low.job_id)
    assert record.state is QUEUED and record.preemptions == 1 and record.restarts == 0
    assert record.transitions[-1].reason.endswith("resumes from epoch 1")


def test_a_victim_that_finishes_before_it_stops_succeeds(loop):
    low = loop.submit(spec(priority=LOW))
    high = loop.submit(spec(priority=HIGH))
    loop.running(low.job_id, RESULT)
    loop.runner(low.job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    assert loop.record(low.job_id).state is SUCCEEDED
    assert loop.record(low.job_id).preemptions == 0
    assert loop.record(high.job_id).state is STARTING


def test_a_server_killed_mid_preemption_resumes_every_job_once_urgent_first(loop, tmp_path):
    low = loop.submit(spec(priority=LOW))
    loop.running(low.job_id, CheckpointSaved(path="/c", epoch=1, step=5, seconds=0.1))
    high = loop.submit(spec(priority=HIGH))
    assert loop.runner(low.job_id).stop_requests == 1
    # kill -9 now: no shutdown, no end of the run; a new server takes the store.
    after = loop.restarted(tmp_path)
    after.controller.recover()
    assert after.record(high.job_id).state is STARTING
    record = after.record(low.job_id)
    assert record.state is QUEUED
    assert record.transitions[-1].reason == "resumed from epoch 1 after a server restart"
    assert after.runners.made.keys() == {high.job_id}
    after.runner(high.job_id).end(RunEnd.SUCCEEDED)
    after.settle()
    assert after.record(low.job_id).state is STARTING
    assert [len(runs) for runs in after.runners.made.values()] == [1, 1]


# -- a hung worker -------------------------------------------------------------------------------


def test_a_worker_that_sends_nothing_past_the_limit_is_killed_and_restarted(tmp_path):
    loop = Harness(tmp_path)
    loop.controller._hang = 30.0
    job = loop.submit()
    runner = loop.running(job.job_id, CheckpointSaved(path="/c", epoch=1, step=5, seconds=0.1))
    for _ in range(5):  # heartbeats keep a long compiled call alive
        loop.clock.advance(20.0)
        loop.running(job.job_id, Heartbeat())
        loop.controller.tick()
    assert runner.stops == []
    assert loop.controller._seconds_to_next_deadline() == 30.0
    loop.clock.advance(30.0)
    loop.controller.tick()
    (stop,) = runner.stops
    assert stop.end is RunEnd.WORKER_DIED and "sent nothing for 30 s: it hung" in stop.reason
    runner.end(stop.end, stop.reason)
    loop.settle()
    record = loop.record(job.job_id)
    assert record.restarts == 1 and record.state is STARTING
    assert record.transitions[-2].reason == (
        "the worker sent nothing for 30 s: it hung, and was killed; restart 1 of 2, from epoch 1"
    )


def test_a_ray_job_is_not_taken_for_hung(tmp_path):
    loop = Harness(tmp_path)
    loop.controller._hang = 30.0
    job = loop.submit(spec("multi_worker", hosts=2))
    loop.clock.advance(300.0)
    loop.controller.tick()
    assert loop.runner(job.job_id).stops == []


def test_a_worker_gets_longer_for_its_first_word(tmp_path):
    loop = Harness(tmp_path)
    loop.controller._hang = 30.0
    job = loop.submit()
    loop.clock.advance(STARTUP_SECONDS - 1)
    loop.controller.tick()
    assert loop.runner(job.job_id).stops == []
    loop.clock.advance(1)
    loop.controller.tick()
    assert [stop.end for stop in loop.runner(job.job_id).stops] == [RunEnd.WORKER_DIED]


# -- bookkeeping that fails ------------------------------------------------------------------


def failing_appends(store: Store, count: int) -> None:
    """The store's next `count` appends fail as a full disk makes them fail."""
    real = store.append_event
    left = [count]

    def append_event(*args, **kwargs):
        if left[0]:
            left[0] -= 1
            raise ResourceExhausted("the state directory /s is full: database or disk is full")
        return real(*args, **kwargs)

    store.append_event = append_event  # type: ignore[method-assign]


def test_an_end_that_cannot_be_recorded_is_retried_and_the_job_fails_with_why(loop):
    job = loop.submit()
    loop.running(job.job_id)
    failing_appends(loop.store, 2)  # SUCCEEDED, then the first FAILED
    loop.runner(job.job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    assert loop.record(job.job_id).state is RUNNING
    assert loop.controller.snapshot.running == {}  # its devices are free
    assert loop.controller._seconds_to_next_deadline() == 5.0
    loop.clock.advance(5.0)
    loop.controller.tick()
    record = loop.record(job.job_id)
    assert record.state is FAILED
    assert record.failure_reason == (
        "the server could not record the job: "
        "the state directory /s is full: database or disk is full"
    )


def test_progress_that_cannot_be_recorded_stops_the_run(loop):
    job = loop.submit()
    runner = loop.running(job.job_id)
    failing_appends(loop.store, 1)
    runner.report(progress(1))
    loop.settle()
    (stop,) = runner.stops
    assert stop.end is RunEnd.FAILED and "state directory /s is full" in stop.reason
    runner.end(stop.end, stop.reason)
    loop.settle()
    assert loop.record(job.job_id).failure_reason == stop.reason


def test_a_job_that_cannot_be_started_fails_and_the_submission_still_answers(loop):
    failing_appends(loop.store, 1)  # its STARTING transition
    job = loop.submit()
    assert job.state is FAILED
    assert job.failure_reason.startswith("the server could not start the job: ")
    assert loop.controller.snapshot.running == {}


# -- tracking ----------------------------------------------------------------------------------


class FakeTracker:
    def __init__(self):
        self.calls: list[tuple[str, object]] = []

    def job_started(self, record):
        self.calls.append(("started", record.state))

    def epoch_end(self, job_id, epoch):
        self.calls.append(("epoch", epoch.epoch))

    def job_ended(self, record, model_dir):
        self.calls.append(("ended", record.state))


def test_the_tracker_sees_one_start_per_run_each_epoch_and_one_end(tmp_path):
    from service.jobs.tracking import TrackingObserver

    tracker = FakeTracker()
    loop = Harness(tmp_path)
    loop.controller._observers = (TrackingObserver(tracker, lambda job_id: None),)
    job = loop.submit()
    loop.running(job.job_id, epoch_end(1))
    loop.runner(job.job_id).end(RunEnd.WORKER_DIED, "killed")
    loop.settle()
    loop.running(job.job_id, epoch_end(2), RESULT)
    loop.runner(job.job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    assert tracker.calls == [
        ("started", STARTING),
        ("epoch", 1),
        ("started", STARTING),
        ("epoch", 2),
        ("ended", SUCCEEDED),
    ]


def test_a_multi_worker_job_is_never_a_victim(loop):
    remote = loop.submit(spec("multi_worker", hosts=2, priority=LOW))
    local = loop.submit(spec(priority=LOW))
    loop.submit(spec(priority=HIGH))
    assert loop.runner(remote.job_id).stop_requests == 0  # it holds nothing of this host
    assert loop.runner(local.job_id).stop_requests == 1


def test_one_owner_may_fill_only_its_share_of_the_queue(tmp_path):
    loop = Harness(tmp_path)
    loop.controller._max_queue_per_owner = 2
    loop.submit(owner="alice")  # runs
    loop.submit(owner="alice")
    loop.submit(owner="alice")
    with pytest.raises(ResourceExhausted, match="alice has 2 jobs waiting, its share"):
        loop.submit(owner="alice")
    assert loop.submit(owner="bob").state is QUEUED  # the others still get in
    for _ in range(3):  # a server without authentication has one anonymous owner: no share
        loop.submit(owner="")


def test_a_finished_jobs_wake_up_is_dropped_so_watched_jobs_cost_no_memory_after(loop):
    job = loop.submit()
    loop.feed.wait_for_change(job.job_id, loop.record(job.job_id).last_sequence, 0.0)
    assert job.job_id in loop.feed._conditions
    loop.runner(job.job_id).end(RunEnd.SUCCEEDED)
    loop.settle()
    assert job.job_id not in loop.feed._conditions


def test_a_damaged_checkpoint_passed_over_is_said_in_the_jobs_history(loop):
    from naive_model.results import Resumed

    job = loop.submit()
    resumed = Resumed(
        path="/s/jobs/j/checkpoints/ckpt-16",
        epoch=2,
        step=16,
        damaged=("ckpt-24 is damaged (Read less bytes than requested)",),
    )
    loop.running(job.job_id, resumed)
    record = loop.record(job.job_id)
    assert (record.transitions[-1].state, record.transitions[-1].reason) == (
        RUNNING,
        "checkpoint ckpt-24 is damaged (Read less bytes than requested); resumed from ckpt-16",
    )


def test_a_cancel_is_handled_before_the_reports_already_waiting(tmp_path):
    """A job that floods the loop with events cannot hold its cancel back behind them."""
    recorder = Recorder()
    # Every Progress stored (no interval), so that the order of all 500 shows.
    loop = Harness(tmp_path, observers=(recorder,), progress_interval_seconds=0)
    job = loop.submit()
    runner = loop.running(job.job_id)
    runner.report(*(progress(step) for step in range(1, 501)))  # waiting, not handled yet
    loop.controller.post(CancelJob(job.job_id))
    loop.settle()
    kinds = [(state, kind) for _, state, kind in recorder.seen[3:]]
    assert kinds[0] == (CANCELLING, StateChange) and runner.stops == [CANCEL]
    assert kinds[1:] == [(CANCELLING, Progress)] * 500  # every report still stored, in order
    stored = loop.store.events_after(job.job_id, 0)
    steps = [event.payload.step for event in stored if isinstance(event.payload, Progress)]
    assert steps == list(range(1, 501))


def stored_progress(loop, job_id: str) -> list:
    events = loop.store.events_after(job_id, 0)
    return [
        event.payload.step if isinstance(event.payload, Progress) else type(event.payload).__name__
        for event in events
        if not isinstance(event.payload, StateChange) or event.sequence > 3
    ]


def test_the_history_keeps_a_progress_per_interval_and_every_epochs_last(loop):
    job = loop.submit()
    # Five calls in one instant: the first is stored, the others held, the newest
    # replacing the older, until the epoch's end stores it before itself.
    calls = [replace(progress(step), call_steps=1) for step in range(1, 6)]
    runner = loop.running(job.job_id, *calls)
    assert stored_progress(loop, job.job_id) == [1]
    assert loop.record(job.job_id).progress.step == 1
    runner.report(epoch_end(1))
    loop.settle()
    assert stored_progress(loop, job.job_id) == [1, 5, "EpochEnd"]
    assert loop.sample("ntrain_train_batches_total", job_id=job.job_id, strategy="cpu") == 5
    # Past the interval, the next call's Progress is stored at once.
    loop.clock.advance(PROGRESS_INTERVAL_SECONDS)
    runner.report(progress(6, 2))
    loop.settle()
    assert stored_progress(loop, job.job_id) == [1, 5, "EpochEnd", 6]


def test_a_held_progress_is_stored_when_its_interval_is_over(loop):
    job = loop.submit()
    loop.running(job.job_id, progress(1), progress(2), progress(3))
    assert loop.controller._seconds_to_next_deadline() == PROGRESS_INTERVAL_SECONDS
    loop.clock.advance(PROGRESS_INTERVAL_SECONDS)
    loop.controller.tick()
    assert stored_progress(loop, job.job_id) == [1, 3]
    assert loop.record(job.job_id).progress.step == 3  # GetJob is at most an interval behind
    # Nothing more is held: the next deadline is the hang limit's.
    assert loop.controller._seconds_to_next_deadline() > PROGRESS_INTERVAL_SECONDS


def test_a_held_progress_comes_before_what_happened_to_the_job(loop):
    job = loop.submit()
    runner = loop.running(job.job_id, progress(1), progress(2))
    loop.controller.call(CancelJob(job.job_id))
    runner.report(progress(3))
    runner.end(RunEnd.CANCELED, "canceled")
    loop.settle()
    events = loop.store.events_after(job.job_id, 0)
    tail = [
        e.payload.step if isinstance(e.payload, Progress) else e.payload.state
        for e in events
        if e.sequence > 3
    ]
    assert tail == [1, 2, CANCELLING, 3, CANCELED]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


def test_a_jobs_end_is_seen_only_once_its_devices_are_free(tmp_path):
    """An observer of the end (as a client told CANCELED is) finds the job no longer running."""
    seen_running: list[dict] = []

    class AtTheEnd:
        def job_event(self, record, event) -> None:
            if record.finished:
                seen_running.append(dict(loop.controller.snapshot.running))

    loop = Harness(tmp_path, observers=(AtTheEnd(),))
    job = loop.submit()
    loop.running(job.job_id)
    loop.controller.call(CancelJob(job.job_id))
    loop.runner(job.job_id).end(RunEnd.CANCELED, "canceled")
    loop.settle()
    assert loop.record(job.job_id).state is CANCELED
    assert seen_running == [{}]
