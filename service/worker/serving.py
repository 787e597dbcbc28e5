"""The inference worker: Evaluate and Predict tasks one after another, models kept loaded.

    python -m service.worker.entry --fd N --preload --model-cache 4 --cache-bytes B

One long-lived process answers every Evaluate and Predict of the server; the
server sends one task at a time and waits for its answer. The process keeps
the SavedModels it loaded, dropping the least recently used once more than
`--model-cache` are held or their weights pass their share of `--cache-bytes`,
and it keeps the test splits Evaluate reads (MNIST's loaded ahead). A model is
known by its job directory and the identity of its files (inode, mtime, size):
a job that exported again is loaded anew, never served stale. A task that
fails is answered with `Failed` and the process goes on; it ends when the
server closes its socket. This module imports TensorFlow (through naive_model).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from naive_model.canonical import open_split
from naive_model.data import (
    DatasetError,
    dataset_file_identity,
    find_mnist,
    load_dataset,
    to_features,
)
from naive_model.export import evaluate_saved_model, load_saved_model, predict_saved_model
from service.protocol import (
    DescribeCache,
    EvaluateTask,
    Evaluation,
    Failed,
    JobFiles,
    ModelCacheState,
    Predictions,
    PredictTask,
    SharedArray,
    WorkerEvent,
)
from service.worker import tasks
from service.worker.cache import LruCache
from service.worker.shared_view import SharedView

# The share of the cache's bytes that test splits may take; models get the rest.
DATA_SHARE = 0.25
DATA_SPLITS = 2  # test splits kept: MNIST's and one other


def model_version(model_dir: Path) -> tuple:
    """What changes when the job exports its model again (the export is renamed into place)."""
    files = (model_dir / "saved_model.pb", model_dir / "variables" / "variables.index")
    return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(os.stat, files))


def model_bytes(model_dir: Path) -> int:
    """The weights as saved: what the loaded model's variables hold, about."""
    return sum(path.stat().st_size for path in (model_dir / "variables").iterdir())


class ModelServer:
    """Answers Evaluate and Predict tasks from the models and test splits it keeps.

    Args:
        max_models: models kept loaded at most.
        cache_bytes: what the kept models' weights and test splits may take
            together (the server's memory share for this process, less TensorFlow);
            0 sets no bound but `max_models`.
    """

    def __init__(self, *, max_models: int, cache_bytes: int):
        if cache_bytes <= 0:
            cache_bytes = sys.maxsize
        data_bytes = int(DATA_SHARE * cache_bytes)
        self.models: LruCache = LruCache(max_models, cache_bytes - data_bytes)
        self.test_splits: LruCache = LruCache(DATA_SPLITS, data_bytes)
        self._shared = SharedView()  # large Predict inputs the server wrote to shared memory

    def warm_up(self, dataset: str | None, data_dir: Path | None) -> None:
        """Export, load and call a tiny model, and load a test split, before the first task.

        The first SavedModel a process loads pays for code paths loaded once
        (about a second here); a warm worker pays it while it waits.
        """
        from naive_model.config import LayerSpec
        from naive_model.export import export_saved_model
        from naive_model.layers import build_model

        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ntrain-warm-up-") as scratch:
            model = build_model(4, (LayerSpec(units=2, activation="softmax"),))
            export_saved_model(model, 4, scratch)
            predict_saved_model(load_saved_model(scratch), np.zeros((1, 4), np.float32))
        _log(f"SavedModel code paths warmed up in {time.perf_counter() - start:.2f} s")
        if dataset == "mnist" and find_mnist(data_dir=data_dir) is None:
            return  # never download speculatively
        if dataset is not None:
            try:
                self._test_split(dataset, data_dir)
                _log(f"test split of {dataset} loaded")
            except (OSError, ValueError) as error:
                _log(f"not preloading {dataset}: {error}")

    def answer(self, message: EvaluateTask | PredictTask | DescribeCache) -> WorkerEvent:
        """The event that answers `message`; a failed task is answered with `Failed`."""
        if isinstance(message, DescribeCache):
            return self.state()
        try:
            if isinstance(message, PredictTask):
                return self.predict(message)
            if isinstance(message, EvaluateTask):
                return self.evaluate(message)
            raise TypeError(f"the inference worker takes no {type(message).__name__}")
        except FileNotFoundError as error:  # a data set that is not there: the request's fault
            traceback.print_exc()
            return Failed(reason=str(error), data_missing=True)
        except DatasetError as error:  # a file that is no usable data set
            traceback.print_exc()
            return Failed(reason=str(error), data_unusable=True)
        except Exception as error:  # reported to the server, which answers with it
            traceback.print_exc()
            return Failed(reason=f"{type(error).__name__}: {error}")

    def predict(self, task: PredictTask) -> Predictions:
        inputs = task.inputs
        if isinstance(inputs, SharedArray):  # large inputs: the server's shared file
            inputs = self._shared.array(inputs)
        inputs = to_features(np.asarray(inputs))  # (examples, input_size) float32, a copy
        serve = self._model(JobFiles(task.job_dir).model)
        return Predictions(probabilities=predict_saved_model(serve, inputs))

    def evaluate(self, task: EvaluateTask) -> Evaluation:
        if task.use_checkpoint:
            # A checkpoint changes while its job trains: restored for each request.
            return tasks.evaluate(task)
        x_test, y_test = self._test_split(task.dataset, task.data_dir, task.dataset_dir)
        metrics = evaluate_saved_model(self._model(JobFiles(task.job_dir).model), x_test, y_test)
        return Evaluation(
            loss=metrics.loss,
            accuracy=metrics.accuracy,
            examples=metrics.examples,
            dataset=task.dataset,
            source="model",
        )

    def state(self) -> ModelCacheState:
        return ModelCacheState(
            models=tuple(Path(str(key)).parent for key in self.models.keys()),
            model_bytes=self.models.nbytes,
            data_bytes=self.test_splits.nbytes,
            loads=self.models.loads,
        )

    def _model(self, model_dir: Path):
        """The model's serving function, loaded unless kept at its current version."""

        def load():
            start = time.perf_counter()
            serve = load_saved_model(model_dir)
            _log(f"loaded {model_dir} in {time.perf_counter() - start:.2f} s")
            return serve, size

        size = model_bytes(model_dir)
        return self.models.get(str(model_dir), model_version(model_dir), load, size)

    def _test_split(
        self, name: str, data_dir: Path | None, folder: Path | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(x_test, y_test) of a data set; the training split is not kept.

        An uploaded data set's `folder` is named by its content: its key never goes stale.
        """

        def load():
            if folder is not None:
                x, y = open_split(folder, "test")
                split = to_features(x), y.astype(np.int32)
            else:
                dataset = load_dataset(name, data_dir=data_dir)
                split = dataset.x_test, dataset.y_test
            return split, split[0].nbytes + split[1].nbytes

        if folder is not None:
            return self.test_splits.get(str(folder), (), load)
        return self.test_splits.get(
            (name, str(data_dir)), dataset_file_identity(name, data_dir), load
        )


def serve(conn: Connection, server: ModelServer) -> None:
    """Answer the server's messages until it closes the socket."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the server let this worker go
        event = server.answer(message)
        sys.stdout.flush()
        sys.stderr.flush()
        conn.send(event)


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} inference worker: {message}", file=sys.stderr, flush=True)
