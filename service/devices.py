"""The host's devices, found once at server start without importing TensorFlow here.

`probe_devices` runs `python -m service.devices` in a child process, which
imports TensorFlow, lists the GPUs it can use and prints them as JSON. The
server process never initialises CUDA itself, so it holds no GPU memory and
each worker can still choose its GPUs through `CUDA_VISIBLE_DEVICES`. A
configured inventory (`ServerConfig.gpu_inventory`, as tests give) skips the probe.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True, kw_only=True)
class GpuDevice:
    """One GPU of the host; `index` is its CUDA index (as CUDA_VISIBLE_DEVICES counts)."""

    index: int
    memory_bytes: int = 0
    description: str = ""

    @property
    def name(self) -> str:
        return f"GPU:{self.index}"


@dataclass(frozen=True, kw_only=True)
class DeviceInventory:
    gpus: tuple[GpuDevice, ...] = ()
    cpu_description: str = ""

    @property
    def counts(self) -> dict[str, int]:
        """Devices by kind, as the metrics report them."""
        return {"GPU": len(self.gpus), "CPU": 1}


def cpu_description() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def fake_gpus(count: int, memory_bytes: int = 16 * 1024**3) -> tuple[GpuDevice, ...]:
    """An inventory of `count` identical GPUs, for tests and benchmarks."""
    return tuple(
        GpuDevice(index=i, memory_bytes=memory_bytes, description="configured")
        for i in range(count)
    )


def _nvidia_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def probe_devices(
    *, force: bool = False, timeout: float = PROBE_TIMEOUT_SECONDS
) -> DeviceInventory:
    """Find the host's GPUs in a child process that imports TensorFlow.

    Without an NVIDIA device node or `nvidia-smi` there can be no CUDA GPU, and
    the probe is skipped unless `force` is set. A probe that fails or hangs is
    logged and taken as "no GPUs": the server still serves CPU jobs.
    """
    if not force and not _nvidia_present():
        return DeviceInventory(cpu_description=cpu_description())
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "service.devices"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("device probe did not answer in %.0f s; serving without GPUs", timeout)
        return DeviceInventory(cpu_description=cpu_description())
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no message"]
        log.warning("device probe failed (%s); serving without GPUs", tail[0])
        return DeviceInventory(cpu_description=cpu_description())
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    return DeviceInventory(
        gpus=tuple(GpuDevice(**gpu) for gpu in found["gpus"]),
        cpu_description=cpu_description(),
    )


def _nvidia_smi_memory() -> dict[int, tuple[int, str]]:
    """Total memory and name per CUDA index from nvidia-smi, when it is installed."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.total,name", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in out.strip().splitlines():
        index, mebibytes, name = (part.strip() for part in line.split(",", 2))
        found[int(index)] = (int(float(mebibytes)) * 1024**2, name)
    return found


def _probe_in_this_process() -> dict:
    import tensorflow as tf

    smi = _nvidia_smi_memory()
    # Under a CUDA_VISIBLE_DEVICES of its own, the server's GPU n is that list's n-th entry.
    visible = [part for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part]
    gpus = []
    for position, device in enumerate(tf.config.list_physical_devices("GPU")):
        entry = visible[position] if position < len(visible) else str(position)
        index = int(entry) if entry.isdigit() else position
        details = tf.config.experimental.get_device_details(device)
        memory, name = smi.get(index, (0, details.get("device_name", "")))
        gpus.append(asdict(GpuDevice(index=index, memory_bytes=memory, description=name)))
    return {"gpus": gpus, "tensorflow_version": tf.__version__}


if __name__ == "__main__":
    print(json.dumps(_probe_in_this_process()))
