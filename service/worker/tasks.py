"""The tasks a worker runs, each a thin adapter over naive_model.

Training runs naive_model's outer loop (`run_training`) and forwards its
typed events to the server unchanged, and to naive_model's TensorBoard writer
in the job's directory; the adapter adds only what is the service's: which
strategy the scheduler chose, the job directory's layout, and GPU memory
readings. This module imports TensorFlow (through naive_model).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from naive_model.config import StrategyConfig
from naive_model.data import (
    DATASET_MEMORY_SHARE,
    Dataset,
    find_mnist,
    host_memory_bytes,
    load_dataset,
    to_features,
)
from naive_model.loop import LoopOptions, run_training
from naive_model.results import EpochEnd
from naive_model.streaming import MappedDataset, map_canonical, plan_data
from naive_model.tensorboard import TensorBoardWriter
from naive_model.trainer import TrainingDiverged, TrainingStopped
from service.protocol import (
    DeviceMemory,
    EvaluateTask,
    Evaluation,
    Failed,
    JobFiles,
    ModelInfo,
    Running,
    Stopped,
    TrainTask,
    WorkerEvent,
)
from service.worker.training_log import describe_event

# The first compiled call of a job runs this many steps, so that the first
# progress arrives right after tracing; later calls use the job's own size.
FIRST_CALL_STEPS = 1

# A warm worker's data set, loaded while it waited: (name, data_dir, Dataset).
_preloaded: tuple[str, Path | None, Dataset] | None = None
# Set to 1 to log where TensorFlow places every op (the GPU smoke test reads it).
LOG_PLACEMENT_ENV = "NTRAIN_LOG_DEVICE_PLACEMENT"


def import_tensorflow() -> int:
    """What a warm worker does while it waits: the imports every task needs.

    Returns:
        The process's resident bytes after them: the runtime's own footprint,
        which depends on what else is installed (Keras imports pandas, JAX or
        torch when it finds them). Admission counts it (`Ready.resident_bytes`).
    """
    import naive_model.export  # noqa: F401
    import naive_model.trainer  # noqa: F401

    return resident_bytes()


def resident_bytes() -> int:
    """This process's resident set size now, in bytes."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no procfs (macOS): the peak so far, an upper bound of it
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes there, KiB on Linux


def preload_dataset(name: str, data_dir: Path | None) -> None:
    global _preloaded
    if name == "mnist" and find_mnist(data_dir=data_dir) is None:
        return  # never download speculatively
    try:
        _preloaded = (name, data_dir, load_dataset(name, data_dir=data_dir))
        _log(f"preloaded {name}")
    except (OSError, ValueError) as error:
        _log(f"not preloading {name}: {error}")


def _load_dataset(name: str, data_dir: Path | None) -> Dataset:
    """The named data set: the preloaded one when it matches, else from disk."""
    if _preloaded is not None and _preloaded[:2] == (name, data_dir):
        return _preloaded[2]
    return load_dataset(name, data_dir=data_dir)


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} worker: {message}", file=sys.stderr, flush=True)


def _strategy(task: TrainTask):
    from naive_model.distribute import limit_gpu_memory, make_strategy, split_cpu

    if task.gpu_memory_limit_mb:  # the job shares its GPU with others
        limit_gpu_memory(task.gpu_memory_limit_mb)
    if task.strategy == "mirrored":
        if not task.cuda_visible_devices:
            split_cpu(task.replicas)
        return make_strategy(StrategyConfig(kind="mirrored", num_devices=task.replicas))
    return make_strategy(StrategyConfig(kind=task.strategy))


def train(
    task: TrainTask,
    send: Callable[[WorkerEvent], None],
    should_stop: Callable[[], bool],
    *,
    stop_reason: Callable[[], str] = lambda: "",
) -> None:
    """Train the job to its end (resuming from its checkpoint), sending every loop event.

    When `should_stop` turns true the loop saves a checkpoint at its next
    compiled-call boundary and this sends `Stopped`; a diverged loss is a
    `Failed` with the loop's one-line reason.
    """
    from naive_model.distribute import describe_strategy
    from naive_model.trainer import Trainer

    files = JobFiles(task.job_dir)
    spec = task.spec
    start = time.perf_counter()
    if os.environ.get(LOG_PLACEMENT_ENV) == "1":
        import tensorflow as tf

        tf.debugging.set_log_device_placement(True)
    _log(
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r} "
        f"CUDA_DEVICE_ORDER={os.environ.get('CUDA_DEVICE_ORDER', '')} "
        f"host GPUs {', '.join(task.gpu_names) or 'none'}"
        + (f", memory limit {task.gpu_memory_limit_mb} MiB" if task.gpu_memory_limit_mb else "")
    )
    strategy = _strategy(task)
    _log(f"strategy: {describe_strategy(strategy)}")
    dataset: Dataset | MappedDataset
    if task.dataset_dir is not None:  # a pushed data set: read from its files as needed
        dataset = map_canonical(task.dataset_dir, name=spec.dataset)
    else:
        dataset = _load_dataset(spec.dataset, task.data_dir)
    _log(f"data set {spec.dataset} ready after {time.perf_counter() - start:.2f} s")
    budget = task.data_budget_bytes or int(DATASET_MEMORY_SHARE * host_memory_bytes())
    plan = plan_data(
        dataset.info, batch_size=spec.train.batch_size, mode=spec.data_mode, budget_bytes=budget
    )
    _log(f"data: {plan.reason}")
    trainer = Trainer(spec.train, dataset, strategy, window_batches=plan.window_batches)
    _log(f"model built after {time.perf_counter() - start:.2f} s")
    _log(f"data on: {json.dumps(trainer.data_devices)}; precision {spec.train.precision}")
    info = ModelInfo(input_size=dataset.input_size, num_classes=dataset.num_classes)
    files.model_info.write_text(json.dumps(asdict(info)))
    send(Running(replicas=trainer.num_replicas, data=plan.reason))
    # A restarted job writes into the same folder; the writer continues its steps.
    tensorboard = TensorBoardWriter(files.tensorboard, learning_rate=spec.train.learning_rate)

    def on_event(event) -> None:
        send(event)
        tensorboard(event)
        _log(describe_event(event))  # train.log, for `ntrain logs -f`
        if isinstance(event, EpochEnd) and task.cuda_visible_devices:
            memory = _gpu_memory(task.gpu_names)
            if memory.bytes_in_use:
                send(memory)
            _reset_gpu_peaks(task.gpu_names)  # the next epoch's peak is its own

    options = LoopOptions(
        checkpoint_dir=files.checkpoints,
        checkpoint_every_epochs=spec.checkpoint_every_epochs,
        checkpoint_seconds=task.checkpoint_seconds,
        export_dir=files.model,
        first_call_steps=FIRST_CALL_STEPS,
        # The folder is the job's own: a checkpoint there is from an earlier
        # run of this job (a server restart, a worker that died).
        resume=True,
    )
    if task.cuda_visible_devices:
        _reset_gpu_peaks(task.gpu_names)  # the first epoch's peak: training, not set-up
    try:
        run_training(trainer, options, on_event=on_event, should_stop=should_stop)
    except TrainingStopped as stopped:
        why = stop_reason()
        _log(f"{stopped} as asked{f' ({why})' if why else ''}, after saving a checkpoint")
        send(Stopped(epoch=stopped.epoch, step=stopped.step))
    except TrainingDiverged as diverged:
        _log(f"training failed: {diverged}")
        send(Failed(reason=str(diverged)))
    finally:
        tensorboard.close()


def _gpu_memory(gpu_names: tuple[str, ...]) -> DeviceMemory:
    """What TensorFlow's allocator gave out on each GPU: now, and at most since the last reset."""
    import tensorflow as tf

    in_use, peak = {}, {}
    for local, name in enumerate(gpu_names):
        try:
            info = tf.config.experimental.get_memory_info(f"GPU:{local}")
        except (ValueError, RuntimeError):
            continue  # this device or build does not report memory
        in_use[name], peak[name] = info["current"], info["peak"]
    return DeviceMemory(bytes_in_use=in_use, peak_bytes=peak)


def _reset_gpu_peaks(gpu_names: tuple[str, ...]) -> None:
    import tensorflow as tf

    for local in range(len(gpu_names)):
        try:
            tf.config.experimental.reset_memory_stats(f"GPU:{local}")
        except (ValueError, RuntimeError):
            continue  # this device or build keeps no statistics


def evaluate(task: EvaluateTask) -> Evaluation:
    dataset: Dataset | MappedDataset
    if task.dataset_dir is not None:  # read as needed: a checkpoint's trainer holds one batch
        dataset = map_canonical(task.dataset_dir, name=task.dataset)
    else:
        dataset = _load_dataset(task.dataset, task.data_dir)
    files = JobFiles(task.job_dir)
    if task.use_checkpoint:
        from naive_model.trainer import Trainer

        window = 1 if isinstance(dataset, MappedDataset) else None
        trainer = Trainer(task.spec.train, dataset, window_batches=window)
        source = trainer.restore_checkpoint(files.checkpoints)
        if source is None:
            raise FileNotFoundError(f"no checkpoint in {files.checkpoints}")
        metrics = trainer.evaluate()
    else:
        from naive_model.export import evaluate_saved_model

        source = "model"
        x_test = to_features(np.asarray(dataset.x_test))  # (num_test, input_size) float32
        metrics = evaluate_saved_model(files.model, x_test, np.asarray(dataset.y_test))
    return Evaluation(
        loss=metrics.loss,
        accuracy=metrics.accuracy,
        examples=metrics.examples,
        dataset=task.dataset,
        source=str(source),
    )
