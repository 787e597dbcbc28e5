"""A pushed data set trained on, evaluated and predicted with by the real worker code.

The worker's own functions (service.worker.tasks, service.worker.serving)
run in this process on a task whose `dataset_dir` is the converted folder, as
the server sends them once it has resolved the job's data set name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
from test_dataset_formats import write_csv, write_parquet

from naive_model.config import LayerSpec, TrainConfig
from naive_model.data import DatasetInfo
from naive_model.streaming import plan_data
from service.jobs.access import LOCAL
from service.jobs.dataset_store import DatasetStore
from service.jobs.dataset_uploads import DatasetUploads, UploadHeader
from service.jobs.validation import admitted_data
from service.protocol import (
    EvaluateTask,
    JobFiles,
    JobSpec,
    PredictTask,
    Running,
    TrainingResult,
    TrainTask,
)

MNIST_INFO = DatasetInfo("mnist", 784, 10, 60000, 10000, feature_bytes=1)


def test_the_mode_is_chosen_by_the_budget_unless_the_job_forces_one():
    held = plan_data(MNIST_INFO, batch_size=128, mode="auto", budget_bytes=2**30)
    assert held.window_batches is None and "within the 1024.0 MiB budget" in held.reason
    streamed = plan_data(MNIST_INFO, batch_size=128, mode="auto", budget_bytes=64 * 2**20)
    assert streamed.window_batches == 64 and "more than the 64.0 MiB budget" in streamed.reason
    small = plan_data(MNIST_INFO, batch_size=128, mode="auto", budget_bytes=8 * 2**20)
    assert small.window_batches == 16  # halved until three windows fit
    forced = plan_data(MNIST_INFO, batch_size=128, mode="stream", budget_bytes=2**30)
    assert forced.window_batches == 64 and "as the job asks" in forced.reason
    held = plan_data(MNIST_INFO, batch_size=128, mode="memory", budget_bytes=1)
    assert held.window_batches is None
    with pytest.raises(ValueError, match="data_mode"):
        plan_data(MNIST_INFO, batch_size=128, mode="disk", budget_bytes=0)


def test_admission_counts_the_window_not_the_data_set():
    big = replace(MNIST_INFO, num_train=60000 * 16)
    spec = JobSpec(train=TrainConfig(batch_size=128), dataset="big")
    held = admitted_data(big, spec, budget_bytes=64 * 2**20)
    assert held.num_train == 3 * 64 * 128 and held.device_bytes < 64 * 2**20
    assert admitted_data(big, replace(spec, data_mode="memory"), 64 * 2**20) == big


def _push(tmp_path, path, **header) -> DatasetStore:
    store = DatasetStore(tmp_path / "state")
    data = path.read_bytes()
    fields = {"name": "table", "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    DatasetUploads(store).upload(UploadHeader(**fields, **header), iter([data]), principal=LOCAL)
    return store


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_worker_trains_evaluates_and_predicts_on_a_pushed_file(tmp_path, kind):
    from service.worker import tasks
    from service.worker.serving import ModelServer

    rng = np.random.default_rng(1)
    centers = rng.random((3, 6)).astype(np.float32) * 4  # three separable classes
    labels = rng.integers(0, 3, 3000)
    features = centers[labels] + rng.normal(0, 0.3, (3000, 6)).astype(np.float32)
    source = tmp_path / f"blobs.{kind}"
    (write_csv if kind == "csv" else write_parquet)(source, features, labels)
    store = _push(tmp_path, source, format=kind, label_column="label")
    version = store.resolve("table")
    spec = JobSpec(
        train=TrainConfig(
            layers=(
                LayerSpec(units=16, activation="relu"),
                LayerSpec(units=3, activation="softmax"),
            ),
            batch_size=32,
            epochs=2,
            learning_rate=0.01,
        ),
        dataset=version.reference,
    )
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    task = TrainTask(
        job_id="job-1",
        job_dir=job_dir,
        spec=spec,
        strategy="cpu",
        replicas=1,
        cuda_visible_devices="",
        gpu_names=(),
        data_dir=None,
        dataset_dir=version.folder,
        data_budget_bytes=50_000,  # the 2700 training rows take more: streamed
    )
    events: list = []
    tasks.train(task, events.append, should_stop=lambda: False)
    (running,) = [event for event in events if isinstance(event, Running)]
    assert running.data.startswith("streamed in windows of")
    (result,) = [event for event in events if isinstance(event, TrainingResult)]
    assert result.test_accuracy > 0.9 and result.has_model
    assert json.loads(JobFiles(job_dir).model_info.read_text())["input_size"] == 6

    server = ModelServer(max_models=2, cache_bytes=0)
    evaluation = server.evaluate(
        EvaluateTask(
            job_dir=job_dir,
            spec=spec,
            dataset=version.reference,
            use_checkpoint=False,
            data_dir=None,
            dataset_dir=version.folder,
        )
    )
    assert evaluation.examples == 300 and evaluation.accuracy == pytest.approx(
        result.test_accuracy
    )
    from_checkpoint = tasks.evaluate(
        EvaluateTask(
            job_dir=job_dir,
            spec=spec,
            dataset=version.reference,
            use_checkpoint=True,
            data_dir=None,
            dataset_dir=version.folder,
        )
    )
    assert from_checkpoint.accuracy == pytest.approx(result.test_accuracy)
    predictions = server.predict(PredictTask(job_dir=job_dir, inputs=centers))
    assert list(predictions.probabilities.argmax(axis=1)) == [0, 1, 2]
