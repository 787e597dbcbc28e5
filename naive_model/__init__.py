"""The naive Dense/Sequential network of Deep Learning with Python, chapter 2.

A small library: layers as `tf.Module`s, a batch generator, the eager training
step of the book, and a compiled, distributed training loop. It knows nothing of
gRPC, Prometheus or jobs; it reports progress through callbacks and return values.

Names are loaded on first use (PEP 562) so that the plain modules
(`naive_model.config`, `naive_model.data`, `naive_model.results`) can be
imported without importing TensorFlow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LayerSpec": "config",
    "TrainConfig": "config",
    "StrategyConfig": "config",
    "Dataset": "data",
    "DatasetNotFoundError": "data",
    "BatchGenerator": "data",
    "load_dataset": "data",
    "load_mnist": "data",
    "load_npz": "data",
    "synthetic_dataset": "data",
    "NaiveDense": "layers",
    "NaiveSequential": "layers",
    "build_model": "layers",
    "one_training_step": "eager",
    "update_weights": "eager",
    "fit": "eager",
    "evaluate": "eager",
    "make_optimizer": "optimizers",
    "make_strategy": "distribute",
    "split_cpu": "distribute",
    "Trainer": "trainer",
    "TrainingStopped": "trainer",
    "TrainingDiverged": "trainer",
    "LoopOptions": "loop",
    "run_training": "loop",
    "Metrics": "results",
    "Progress": "results",
    "EpochResult": "results",
    "EpochEnd": "results",
    "CheckpointSaved": "results",
    "Resumed": "results",
    "TrainingResult": "results",
    "export_saved_model": "export",
    "load_saved_model": "export",
    "predict_saved_model": "export",
    "evaluate_saved_model": "export",
    "TensorBoardWriter": "tensorboard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'naive_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"naive_model.{module}"), name)
    globals()[name] = value
    return value
