"""Two worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from naive_model.config import LayerSpec, StrategyConfig, TrainConfig
from naive_model.data import synthetic_dataset
from naive_model.distribute import make_strategy
from naive_model.streaming import host_rows, window_block
from naive_model.trainer import Trainer

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("multi_worker_main.py")


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_cluster(tmp_path, *arguments):
    """Two workers of multi_worker_main.py on loopback; their saved results, worker 0's first."""
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        env.pop("TF_CONFIG", None)
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    json.dumps(tf_config),
                    str(tmp_path / f"w{index}.npz"),
                    str(tmp_path / "ckpt"),
                    *arguments,
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [worker.communicate(timeout=240)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    return [np.load(tmp_path / f"w{index}.npz") for index in range(2)]


def test_two_workers_on_loopback_end_with_identical_weights(tmp_path):
    first, second = _run_cluster(tmp_path)
    assert int(first["replicas"]) == 2 and int(second["replicas"]) == 2
    assert bool(first["chief"]) and not bool(second["chief"])
    # 1024 examples / global batch 64 = 16 steps on each worker, in lock step.
    assert int(first["steps"]) == int(second["steps"]) == 16
    for key in ("arr_0", "arr_1", "arr_2", "arr_3"):
        np.testing.assert_array_equal(first[key], second[key])
    assert float(first["loss"]) == pytest.approx(float(second["loss"]))
    # Only the chief's checkpoint is kept.
    assert tf.train.latest_checkpoint(str(tmp_path / "ckpt")).endswith("ckpt-16")
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".worker")]

    # And the cluster trained the same model one process would, with the same global batch.
    _assert_trained_as_one_process(first)


def test_streamed_each_worker_reads_only_its_share_of_every_window(tmp_path):
    first, second = _run_cluster(tmp_path, "4")  # windows of 4 batches of 64: 256 rows
    for key in ("arr_0", "arr_1", "arr_2", "arr_3"):
        np.testing.assert_array_equal(first[key], second[key])
    # The epoch's last window (of 4), and the rows of it each worker's replica trains on.
    x_train = _dataset().x_train
    start, order = window_block(len(x_train), 256, 3, seed=_config().seed, epoch=1)
    shares = []
    for host, result in enumerate((first, second)):
        said = f"host {host} of 2 reads and holds 128 of each window's 256 rows"
        assert str(result["share"]) == said
        rows = np.sort(host_rows(order, 64, host, 2))
        np.testing.assert_array_equal(result["held_images"], x_train[start + rows])
        shares.append(set(rows.tolist()))
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 256
    # Their batches were the ones one process streaming the whole window trains on.
    _assert_trained_as_one_process(first, window_batches=4)


def _config() -> TrainConfig:
    """multi_worker_main.py's config."""
    return TrainConfig(
        layers=(LayerSpec(units=32, activation="relu"), LayerSpec(units=10, activation="softmax")),
        optimizer="adam",
        learning_rate=0.01,
        batch_size=64,
        steps_per_execution=4,
    )


def _dataset():
    return synthetic_dataset(num_train=1024, num_test=256, input_size=64)


def _assert_trained_as_one_process(result, window_batches=None) -> None:
    single = Trainer(
        _config(),
        _dataset(),
        make_strategy(StrategyConfig(kind="cpu")),
        window_batches=window_batches,
    )
    single.train_epoch()
    for index, weight in enumerate(single.model.weights):
        np.testing.assert_allclose(result[f"arr_{index}"], weight.numpy(), rtol=1e-4, atol=1e-5)
