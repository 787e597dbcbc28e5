"""Choosing a tf.distribute strategy: CPU, one GPU, mirrored GPUs, or several hosts."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from naive_model.config import StrategyConfig


def split_cpu(count: int) -> list[tf.config.LogicalDevice]:
    """Split the host CPU into `count` logical devices.

    Lets a CPU-only machine run MirroredStrategy over several replicas (tests,
    laptops). Must run before TensorFlow initialises its devices.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )
    return tf.config.list_logical_devices("CPU")


def limit_gpu_memory(megabytes: int) -> list[tf.config.LogicalDevice]:
    """Let TensorFlow use at most `megabytes` of each visible GPU.

    For several jobs sharing one GPU: each process gets one logical device of
    that size per GPU instead of growing into the whole card. Must run before
    TensorFlow initialises its devices; memory growth is then left off.
    """
    if megabytes < 1:
        raise ValueError(f"megabytes must be at least 1, got {megabytes}")
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.set_logical_device_configuration(
            gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=megabytes)]
        )
    return tf.config.list_logical_devices("GPU")


def make_strategy(config: StrategyConfig | None = None) -> tf.distribute.Strategy:
    """The strategy `config` asks for.

    Raises:
        ValueError: an unknown kind, a GPU strategy on a host without one, or
            more devices than the host has.
    """
    config = config or StrategyConfig()
    config.validate()
    if config.kind == "multi_worker":
        return _multi_worker(config)
    _grow_gpu_memory()
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
    if config.kind == "auto":
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy(gpus)
        return tf.distribute.OneDeviceStrategy(gpus[0] if gpus else cpus[0])
    if config.kind == "cpu":
        return tf.distribute.OneDeviceStrategy(cpus[0])
    if config.kind == "gpu":
        if not gpus:
            raise ValueError("strategy 'gpu' needs a GPU, but TensorFlow sees none")
        return tf.distribute.OneDeviceStrategy(gpus[0])
    # mirrored: explicit devices, else GPUs, else the logical CPUs of split_cpu.
    devices = list(config.devices) or gpus or cpus
    if config.num_devices:
        if config.num_devices > len(devices):
            raise ValueError(
                f"num_devices must be at most the {len(devices)} devices visible, "
                f"got {config.num_devices}"
            )
        devices = devices[: config.num_devices]
    if all("GPU" in device.upper() for device in devices):
        return tf.distribute.MirroredStrategy(devices)
    # NCCL, MirroredStrategy's default, is GPU-only; reduce through one device instead.
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def _grow_gpu_memory() -> None:
    """Allocate GPU memory as needed instead of all of it at start.

    Then the memory TensorFlow reports in use is what the job needs, and an
    evaluation or a monitoring agent can share the device. Only possible
    before TensorFlow initialises the GPUs; later it is left as it is.
    """
    for gpu in tf.config.list_physical_devices("GPU"):
        if tf.config.get_logical_device_configuration(gpu) is not None:
            continue  # a memory limit (limit_gpu_memory) and growth exclude each other
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            return


def _multi_worker(config: StrategyConfig) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy from a TF_CONFIG-style dict, or $TF_CONFIG.

    Must be the first TensorFlow call of the process: it starts the
    collective ops server that the other workers connect to.
    """
    if config.cluster is not None:
        os.environ["TF_CONFIG"] = json.dumps(config.cluster)
    if "TF_CONFIG" not in os.environ:
        raise ValueError("strategy 'multi_worker' needs a cluster spec or the TF_CONFIG variable")
    return tf.distribute.MultiWorkerMirroredStrategy()


def describe_strategy(strategy: tf.distribute.Strategy) -> str:
    """Its kind, devices and all-reduce, in words, for logs.

    E.g. "MirroredStrategy over GPU:0, GPU:1; all-reduce CollectiveAllReduce (NCCL)".
    """
    extended = strategy.extended
    devices = ", ".join(name.split("device:")[-1] for name in extended.worker_devices)
    text = f"{type(strategy).__name__} over {devices}"
    # What MirroredStrategy reduces with: not public API, read only to report it.
    reduce_ops = getattr(extended, "_cross_device_ops", None)
    if reduce_ops is not None:
        text += f"; all-reduce {type(reduce_ops).__name__}"
        options = getattr(reduce_ops, "_options", None)
        if options is not None:
            text += f" ({options.implementation.name})"
    return text


def host_place(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """This process's index among the cluster's training hosts, and their count.

    (0, 1) outside a multi-worker cluster. The index is the one
    MultiWorkerMirroredStrategy orders replicas by: the chief first, then
    the workers by task id, so host h holds replicas h * L to (h + 1) * L - 1
    (L local replicas each).
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if resolver is None or not spec:
        return 0, 1
    chiefs, workers = len(spec.get("chief", ())), len(spec.get("worker", ()))
    index = resolver.task_id if resolver.task_type == "chief" else chiefs + resolver.task_id
    return index, chiefs + workers


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes shared artifacts (checkpoints, exports)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().jobs
    )
