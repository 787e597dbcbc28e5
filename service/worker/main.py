"""The code that runs inside a worker process: one task, then the process ends.

The server spawns a process per job (and per Evaluate or Predict) with
`run_worker` as its target. A warm worker imports TensorFlow first, says
"ready", and waits; TensorFlow is imported but not initialised, so the task can
still choose its GPUs (CUDA_VISIBLE_DEVICES) and split the CPU into logical
devices. This module itself imports nothing heavy, so a cold worker pays the
import only once it knows its task.

Messages to the server are `(kind, data)` tuples over the pipe:
ready, running, progress (once per compiled call), epoch_end, checkpoint,
gpu_memory, result, answer (Evaluate, Predict), data_missing (a data set was
not found) and failed (a one-line reason).
The server ends a job by ending this process; nothing here polls for it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# The first compiled call of a job runs this many steps, so that the first
# progress arrives right after tracing; later calls use the job's own size.
FIRST_CALL_STEPS = 1
CHECKPOINTS = "checkpoints"
MODEL = "model"
MODEL_INFO = "model.json"
TRAIN_LOG = "train.log"
TASK_LOG = "tasks.log"


# A warm worker's data set, loaded while it waited: (name, data_dir, Dataset).
_preloaded: tuple[str, str | None, Any] | None = None


def run_worker(
    conn: Connection,
    preload: bool,
    log_path: str | None = None,
    dataset: tuple[str, str | None] | None = None,
) -> None:
    """Process entry point: optionally preload TensorFlow, then run one task.

    Args:
        preload: import TensorFlow now (a warm worker), before the task comes.
        log_path: where output goes until the task names its own log.
        dataset: (name, data_dir) of a data set a warm worker loads while it
            waits, when it is on disk: most jobs train on the default one.
    """
    _exit_with_parent()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if log_path is not None:
        _redirect_output(Path(log_path))
    if preload:
        import naive_model.export  # noqa: F401 - imports TensorFlow: the point of a warm worker
        import naive_model.trainer  # noqa: F401

        if dataset is not None:
            _preload_dataset(*dataset)
        conn.send(("ready", {}))
    try:
        task = conn.recv()
    except EOFError:
        return  # the server let this warm worker go
    # Before TensorFlow touches a device: which GPUs this process may see.
    os.environ["CUDA_VISIBLE_DEVICES"] = task.get("cuda_visible_devices", "")
    job_dir = Path(task["job_dir"])
    _redirect_output(job_dir / (TRAIN_LOG if task["kind"] == "train" else TASK_LOG))
    try:
        if task["kind"] == "train":
            _train(conn, task)
        elif task["kind"] == "evaluate":
            conn.send(("answer", _evaluate(task)))
        elif task["kind"] == "predict":
            conn.send(("answer", _predict(task)))
        else:
            raise ValueError(f"unknown task kind {task['kind']!r}")
    except FileNotFoundError as error:  # a data set that is not there: the request's fault
        traceback.print_exc()
        conn.send(("data_missing", str(error)))
    except Exception as error:  # reported to the server, which fails the job with it
        traceback.print_exc()
        conn.send(("failed", f"{type(error).__name__}: {error}"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.close()


def _preload_dataset(name: str, data_dir: str | None) -> None:
    global _preloaded
    from naive_model.data import load_dataset, mnist_candidates

    if name == "mnist" and not any(p.is_file() for p in mnist_candidates(data_dir=data_dir)):
        return  # never download speculatively
    try:
        _preloaded = (name, data_dir, load_dataset(name, data_dir=data_dir))
        _log(f"preloaded {name}")
    except (OSError, ValueError) as error:
        _log(f"not preloading {name}: {error}")


def _load_dataset(name: str, data_dir: str | None):
    """The named data set: the preloaded one when it matches, else from disk."""
    from naive_model.data import load_dataset

    if _preloaded is not None and _preloaded[:2] == (name, data_dir):
        return _preloaded[2]
    return load_dataset(name, data_dir=data_dir)


def _log(message: str) -> None:
    print(
        f"{time.strftime('%H:%M:%S')} worker {os.getpid()}: {message}", file=sys.stderr, flush=True
    )


def _exit_with_parent() -> None:
    """End this process if the server dies, so no orphan keeps a GPU."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _redirect_output(path: Path) -> None:
    """Send this process's stdout and stderr (TensorFlow's C++ logs too) to a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def _strategy(task: dict[str, Any]):
    from naive_model.config import StrategyConfig
    from naive_model.distribute import make_strategy, split_cpu

    kind, replicas = task["strategy"], task["replicas"]
    if kind == "mirrored":
        if not task["cuda_visible_devices"]:
            split_cpu(replicas)
        return make_strategy(StrategyConfig(kind="mirrored", num_devices=replicas))
    return make_strategy(StrategyConfig(kind=kind))


def _train(conn: Connection, task: dict[str, Any]) -> None:
    from naive_model.trainer import Trainer
    from service.spec import JobSpec

    spec = JobSpec.from_dict(task["spec"])
    job_dir = Path(task["job_dir"])
    start = time.perf_counter()
    strategy = _strategy(task)
    dataset = _load_dataset(spec.dataset, task["data_dir"])
    _log(f"data set {spec.dataset} ready after {time.perf_counter() - start:.2f} s")
    trainer = Trainer(spec.train, dataset, strategy)
    _log(f"model built after {time.perf_counter() - start:.2f} s")
    conn.send(("running", {"replicas": trainer.num_replicas}))

    epochs = spec.train.epochs
    examples_done = 0
    # The first call pays for tracing: the job's rate is taken over the others.
    steady = {"calls": 0, "examples": 0, "seconds": 0.0}

    def on_progress(progress) -> None:
        nonlocal examples_done
        examples_done += progress.examples
        steady["calls"] += 1
        if steady["calls"] > 1:
            steady["examples"] += progress.examples
            steady["seconds"] += progress.seconds
        conn.send(
            (
                "progress",
                {
                    "progress": {
                        "epoch": progress.epoch,
                        "epochs": epochs,
                        "step": progress.step,
                        "steps_per_epoch": progress.steps_per_epoch,
                        "step_in_epoch": progress.step_in_epoch,
                        "loss": progress.loss,
                        "accuracy": progress.accuracy,
                        "examples_per_second": progress.examples_per_second,
                        "examples": examples_done,
                    },
                    "steps": progress.steps,
                    "examples": progress.examples,
                    "seconds": progress.seconds,
                },
            )
        )

    checkpoint_dir = job_dir / CHECKPOINTS
    train_seconds = 0.0
    last = None
    for epoch in range(1, epochs + 1):
        last = trainer.train_epoch(
            on_progress, first_call_steps=FIRST_CALL_STEPS if epoch == 1 else None
        )
        train_seconds += last.seconds
        evaluation = trainer.evaluate()
        conn.send(
            (
                "epoch_end",
                {
                    "epoch": epoch,
                    "train_loss": last.loss,
                    "train_accuracy": last.accuracy,
                    "eval_loss": evaluation.loss,
                    "eval_accuracy": evaluation.accuracy,
                    "seconds": last.seconds,
                },
            )
        )
        _send_gpu_memory(conn, task)
        every = spec.checkpoint_every_epochs
        if epoch == epochs or (every and epoch % every == 0):
            start = time.perf_counter()
            path = trainer.save_checkpoint(checkpoint_dir)
            conn.send(("checkpoint", {"path": path, "seconds": time.perf_counter() - start}))

    _export(trainer, job_dir, dataset)
    final = trainer.evaluate()
    if steady["seconds"] > 0:
        examples_per_second = steady["examples"] / steady["seconds"]
    else:
        examples_per_second = last.examples * epochs / train_seconds if train_seconds else 0.0
    conn.send(
        (
            "result",
            {
                "train_loss": last.loss,
                "train_accuracy": last.accuracy,
                "test_loss": final.loss,
                "test_accuracy": final.accuracy,
                "steps": trainer.global_step,
                "train_seconds": train_seconds,
                "examples_per_second": examples_per_second,
                "has_model": True,
            },
        )
    )


def _export(trainer, job_dir: Path, dataset) -> None:
    """Write the SavedModel next to the checkpoints; a reader never sees half of it."""
    staging = job_dir / f".{MODEL}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.export(staging)
    shutil.rmtree(job_dir / MODEL, ignore_errors=True)
    staging.rename(job_dir / MODEL)
    info = {"input_size": dataset.input_size, "num_classes": dataset.num_classes}
    (job_dir / MODEL_INFO).write_text(json.dumps(info))


def _send_gpu_memory(conn: Connection, task: dict[str, Any]) -> None:
    if not task["cuda_visible_devices"]:
        return
    import tensorflow as tf

    in_use = {}
    for local, name in enumerate(task["gpu_names"]):
        try:
            in_use[name] = tf.config.experimental.get_memory_info(f"GPU:{local}")["current"]
        except (ValueError, RuntimeError):
            continue  # this device or build does not report memory
    if in_use:
        conn.send(("gpu_memory", in_use))


def _evaluate(task: dict[str, Any]) -> dict[str, Any]:
    dataset = _load_dataset(task["dataset"], task["data_dir"])
    job_dir = Path(task["job_dir"])
    if task["use_checkpoint"]:
        from naive_model.trainer import Trainer
        from service.spec import JobSpec

        spec = JobSpec.from_dict(task["spec"])
        trainer = Trainer(spec.train, dataset)
        source = trainer.restore_checkpoint(job_dir / CHECKPOINTS)
        if source is None:
            raise FileNotFoundError(f"no checkpoint in {job_dir / CHECKPOINTS}")
        metrics = trainer.evaluate()
    else:
        from naive_model.export import evaluate_saved_model

        source = "model"
        metrics = evaluate_saved_model(job_dir / MODEL, dataset.x_test, dataset.y_test)
    return {
        "loss": metrics.loss,
        "accuracy": metrics.accuracy,
        "examples": metrics.examples,
        "dataset": task["dataset"],
        "source": str(source),
    }


def _predict(task: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from naive_model.export import predict_saved_model

    inputs = np.asarray(task["inputs"], dtype=np.float32)  # (examples, input_size)
    probabilities = predict_saved_model(Path(task["job_dir"]) / MODEL, inputs)
    return {"probabilities": probabilities}  # (examples, classes)
