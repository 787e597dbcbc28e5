"""One Ray Train worker of a multi_worker job: naive_model's outer loop, as a local job's.

Each worker builds the MultiWorkerMirroredStrategy from the TF_CONFIG Ray
wrote, restores Ray's latest checkpoint when the group was restarted, and runs
`run_training`. Every worker saves and reports its checkpoints (the save is
collective); Ray keeps the chief's. The chief also writes what the server
reads from the shared job directory (the model's shape, a copy of each
checkpoint, the SavedModel) and sends its events to the driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path


def train_worker(config: dict) -> None:
    """The function Ray Train runs on every worker (`train_loop_config` is `config`)."""
    from service.protocol import RayTrainTask

    start = time.monotonic()
    task = RayTrainTask.from_json(config["task"])
    events = config["events"]
    # Ray's TensorFlow backend sets it; naive_model is written for Keras 3.
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
    if task.gpus_per_host == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker on a GPU node stays off them
    from naive_model.config import StrategyConfig
    from naive_model.distribute import is_chief, make_strategy

    # First TensorFlow call: it starts the collective server the other workers dial.
    strategy = make_strategy(StrategyConfig(kind="multi_worker"))
    _log(f"strategy ready after {time.monotonic() - start:.1f} s")
    _train(task, strategy, is_chief(strategy), events, start)


def _log(message: str) -> None:
    """A line of the driver's log (Ray forwards a worker's output there, with its pid)."""
    print(f"ntrain: {message}", flush=True)


def _train(task, strategy, chief: bool, events, start: float) -> None:
    import ray.train

    from naive_model.data import Dataset, load_dataset
    from naive_model.loop import LoopOptions, run_training
    from naive_model.streaming import MappedDataset, map_canonical, plan_data
    from naive_model.trainer import Trainer, TrainingDiverged
    from service.driver.ray_driver import WeightsDigest
    from service.protocol import CheckpointSaved, Failed, JobFiles, ModelInfo, Running

    rank = ray.train.get_context().get_world_rank()
    files = JobFiles(task.job_dir)
    prefix = f"ntrain-{task.job_id}-{rank}-"
    # What this rank's worker of an earlier attempt left, when it was killed.
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    checkpoints = scratch / "checkpoints"
    try:
        restored = ray.train.get_checkpoint()
        if restored is not None:  # the group restarted: every worker resumes from Ray's copy
            with restored.as_directory() as directory:
                shutil.copytree(directory, checkpoints)
        dataset: Dataset | MappedDataset
        if task.dataset_dir is not None:  # a pushed data set: read from its files as needed
            dataset = map_canonical(task.dataset_dir, name=task.spec.dataset)
        else:
            dataset = load_dataset(task.spec.dataset, data_dir=task.data_dir)
        # The same plan on every host: the server's budget, not this node's memory.
        plan = plan_data(
            dataset.info,
            batch_size=task.spec.train.batch_size,
            mode=task.spec.data_mode,
            budget_bytes=task.data_budget_bytes,
        )
        trainer = Trainer(task.spec.train, dataset, strategy, window_batches=plan.window_batches)
        share = f"; {trainer.data_share}" if trainer.data_share else ""
        _log(f"rank {rank}: training data {plan.reason}{share}")
        _log(f"rank {rank}: data and model ready after {time.monotonic() - start:.1f} s")
        if chief:
            info = ModelInfo(input_size=dataset.input_size, num_classes=dataset.num_classes)
            files.root.mkdir(parents=True, exist_ok=True)
            files.model_info.write_text(json.dumps(asdict(info)))
            events.put(Running(replicas=trainer.num_replicas, data=plan.reason))

        def on_event(event) -> None:
            if isinstance(event, CheckpointSaved):
                checkpoint = None
                if chief:
                    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoints))
                    _mirror(checkpoints, files.checkpoints)
                    event = replace(event, path=str(files.checkpoints / Path(event.path).name))
                # Every worker reports (Ray counts them); only the chief's directory is kept.
                ray.train.report({"epoch": event.epoch, "step": event.step}, checkpoint=checkpoint)
            if chief:
                events.put(event)

        options = LoopOptions(
            checkpoint_dir=checkpoints,
            checkpoint_every_epochs=task.spec.checkpoint_every_epochs,
            # Only the chief's SavedModel is kept; every worker saves (it may be collective).
            export_dir=files.model if chief else scratch / "model",
            first_call_steps=1,
            resume=True,
        )
        try:
            run_training(trainer, options, on_event=on_event)
        except TrainingDiverged as diverged:  # every worker sees the same all-reduced loss
            if chief:
                events.put(Failed(reason=str(diverged)))
            return
        digest = hashlib.sha256()
        for weight in trainer.model.weights:
            digest.update(weight.numpy().tobytes())
        events.put(WeightsDigest(rank, digest.hexdigest()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _mirror(source: Path, target: Path) -> None:
    """Copy the checkpoint folder to the shared job directory, replacing the old copy."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
