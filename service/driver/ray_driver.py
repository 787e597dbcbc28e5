"""The driver of a multi_worker job: what Ray Jobs runs on the cluster for ntrain.

Ray Jobs starts `python -m service.driver` (the cluster's own interpreter,
with ntrain installed) under the submission id of the ntrain job, with the
job's `RayTrainTask` as JSON in $NTRAIN_RAY_TASK. The driver runs a Ray Train
`TensorflowTrainer` of `task.hosts` workers, one per node (STRICT_SPREAD),
each running `service.driver.train.train_worker`: naive_model's outer loop
under a MultiWorkerMirroredStrategy whose TF_CONFIG Ray wrote. Ray restarts
the worker group from its latest checkpoint up to `max_restarts` times.

The chief worker's typed events come to the driver through a Ray queue; the
driver numbers them and prints each as one line (`service.protocol.event_line`)
on its standard output, which the server reads through Ray Jobs' logs
endpoint. It may import ray and TensorFlow; never grpc.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from service.protocol import (
    RAY_TASK_ENV,
    Failed,
    RayEvent,
    RayTrainTask,
    event_line,
)

# Ray Train V2 (the default from Ray 2.5x; set for the versions where it was opt-in).
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
DRAIN_SECONDS = 0.2


class EventPrinter:
    """Prints what the chief puts on `queue`, numbered from 1, until `close`."""

    def __init__(self, queue, out=sys.stdout):
        self._queue = queue
        self._out = out
        self._sequence = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def print_event(self, event: RayEvent) -> None:
        self._sequence += 1
        print(event_line(self._sequence, event), file=self._out, flush=True)

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self._queue.get(timeout=DRAIN_SECONDS)
            except Empty:
                if self._closing.is_set():
                    return
                continue
            if isinstance(item, WeightsDigest):
                print(f"ntrain: worker {item.rank} weights sha256 {item.sha256}", flush=True)
            else:
                self.print_event(item)

    def close(self) -> None:
        """Print what is still queued, then stop."""
        self._closing.set()
        self._thread.join()


class WeightsDigest:
    """A worker's final weights, hashed: every worker must end with the same."""

    def __init__(self, rank: int, sha256: str):
        self.rank = rank
        self.sha256 = sha256


def main() -> int:
    task = RayTrainTask.from_json(os.environ[RAY_TASK_ENV])
    start = time.monotonic()
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer
    from ray.util.queue import Queue

    from service.driver.train import train_worker

    ray.init()  # the cluster Ray Jobs runs this driver on
    print(f"ntrain: driver for {task.job_id} on Ray {ray.__version__}", flush=True)
    # An actor takes a CPU to be placed unless told otherwise: the workers need them.
    events = Queue(actor_options={"num_cpus": 0})
    printer = EventPrinter(events)
    use_gpu = task.gpus_per_host > 0
    trainer = TensorflowTrainer(
        train_worker,
        train_loop_config={"task": task.to_json(), "events": events},
        scaling_config=ScalingConfig(
            num_workers=task.hosts,
            use_gpu=use_gpu,
            resources_per_worker={"GPU": task.gpus_per_host} if use_gpu else {"CPU": 1},
            # One worker per node: each "host" of the job is a Ray node of its own.
            placement_strategy="STRICT_SPREAD",
        ),
        run_config=RunConfig(
            name=task.job_id,
            storage_path=str(task.storage_path),
            failure_config=FailureConfig(max_failures=task.spec.max_restarts),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    failure = None
    print(f"ntrain: training starts after {time.monotonic() - start:.1f} s", flush=True)
    try:
        result = trainer.fit()
        if result.error is not None:
            failure = str(result.error)
    except Exception as error:  # Ray's TrainingFailedError after the last restart
        failure = f"{type(error).__name__}: {error}"
    printer.close()
    print(f"ntrain: driver done after {time.monotonic() - start:.1f} s", flush=True)
    if failure is not None:
        reason = " ".join(failure.split())[:500]
        printer.print_event(Failed(reason=f"the Ray training failed: {reason}"))
        return 1
    return 0
