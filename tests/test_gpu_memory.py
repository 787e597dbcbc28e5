"""GPU memory: the worker's readings and limits, with TensorFlow's GPU calls faked.

No GPU runs here: `tf.config`'s device functions are replaced by fakes that
behave as TensorFlow documents them for a host with two GPUs, and the test
checks what the worker and the library ask of them and what reaches the metrics.
"""

from __future__ import annotations

import pytest
import tensorflow as tf
from prometheus_client import CollectorRegistry

from naive_model import distribute
from service.jobs.reporting import report_metrics
from service.metrics import ServiceMetrics
from service.protocol import DeviceMemory
from service.worker import tasks

TWO_GPUS = [
    tf.config.PhysicalDevice(name=f"/physical_device:GPU:{i}", device_type="GPU") for i in (0, 1)
]


@pytest.fixture
def two_gpus(monkeypatch):
    """tf.config as on a host with two GPUs; returns the calls made to it."""
    calls: dict[str, list] = {"logical": [], "growth": [], "reset": []}
    configured: dict[str, list] = {}

    def list_physical(kind=None):
        return TWO_GPUS if kind == "GPU" else []

    def set_logical(device, configurations):
        configured[device.name] = configurations
        calls["logical"].append((device.name, [c.memory_limit for c in configurations]))

    monkeypatch.setattr(tf.config, "list_physical_devices", list_physical)
    monkeypatch.setattr(tf.config, "set_logical_device_configuration", set_logical)
    monkeypatch.setattr(
        tf.config, "get_logical_device_configuration", lambda d: configured.get(d.name)
    )
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: [])
    monkeypatch.setattr(
        tf.config.experimental,
        "set_memory_growth",
        lambda device, on: calls["growth"].append(device.name),
    )
    memory = {"GPU:0": {"current": 300, "peak": 900}, "GPU:1": {"current": 310, "peak": 950}}
    monkeypatch.setattr(tf.config.experimental, "get_memory_info", lambda d: memory[d])
    monkeypatch.setattr(
        tf.config.experimental, "reset_memory_stats", lambda d: calls["reset"].append(d)
    )
    return calls


def test_a_shared_gpu_gets_a_memory_limit_and_no_growth(two_gpus):
    distribute.limit_gpu_memory(3584)
    assert two_gpus["logical"] == [
        ("/physical_device:GPU:0", [3584]),
        ("/physical_device:GPU:1", [3584]),
    ]
    distribute._grow_gpu_memory()  # what make_strategy does next
    assert two_gpus["growth"] == []  # TensorFlow refuses growth beside a logical device


def test_a_gpu_of_its_own_grows_its_memory(two_gpus):
    distribute._grow_gpu_memory()
    assert two_gpus["growth"] == ["/physical_device:GPU:0", "/physical_device:GPU:1"]


def test_the_worker_reads_current_and_peak_and_resets_the_peak(two_gpus):
    # The worker sees its GPUs as GPU:0 and GPU:1; the host calls them GPU:4 and GPU:6.
    memory = tasks._gpu_memory(("GPU:4", "GPU:6"))
    assert memory == DeviceMemory(
        bytes_in_use={"GPU:4": 300, "GPU:6": 310}, peak_bytes={"GPU:4": 900, "GPU:6": 950}
    )
    tasks._reset_gpu_peaks(("GPU:4", "GPU:6"))
    assert two_gpus["reset"] == ["GPU:0", "GPU:1"]

    metrics = ServiceMetrics(CollectorRegistry())
    report_metrics(metrics, "job-m", "mirrored", memory)
    value = metrics.registry.get_sample_value
    labels = {"job_id": "job-m", "strategy": "mirrored", "device": "GPU:6"}
    assert value("ntrain_gpu_memory_in_use_bytes", labels) == 310
    assert value("ntrain_gpu_memory_peak_bytes", labels) == 950
