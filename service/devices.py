"""The host's devices, found once at server start without importing TensorFlow here.

`probe_devices` runs `python -m service.devices` in a child process, which
imports TensorFlow, lists the GPUs it can use and prints them as JSON. The
server process never initialises CUDA itself, so it holds no GPU memory and
each worker can still choose its GPUs through `CUDA_VISIBLE_DEVICES`. A
configured inventory (`ServerConfig.gpu_inventory`, as tests give) skips the probe.

Device identity: the probe and every worker count GPUs in PCI bus order
(`CUDA_DEVICE_ORDER=PCI_BUS_ID`, unless the server's environment names an
order), which is nvidia-smi's numbering. When the server's own
`CUDA_VISIBLE_DEVICES` restricts it, each GPU keeps the token that list names
it by (an index, a UUID `GPU-...` or a MIG id `MIG-...`) and a worker is
given those tokens unchanged, so it can never reach a GPU the server could
not. Names (`GPU:3`, `GPU:0/MIG:1`) are the host's numbering, as nvidia-smi
shows it, wherever nvidia-smi can tell.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True, kw_only=True)
class GpuDevice:
    """One GPU the server may use.

    index: its place among the server's GPUs, what the scheduler hands out.
    cuda_id: what CUDA_VISIBLE_DEVICES calls it (an index in PCI bus order, a
        UUID or a MIG id); empty means `index`.
    host_name: which GPU of the host it is, e.g. "GPU:3"; empty means GPU:index.
    """

    index: int
    memory_bytes: int = 0
    description: str = ""
    cuda_id: str = ""
    host_name: str = ""

    @property
    def name(self) -> str:
        return self.host_name or f"GPU:{self.index}"

    @property
    def visible_id(self) -> str:
        """This GPU's token for a worker's CUDA_VISIBLE_DEVICES."""
        return self.cuda_id or str(self.index)


@dataclass(frozen=True, kw_only=True)
class DeviceInventory:
    gpus: tuple[GpuDevice, ...] = ()
    cpu_description: str = ""

    @property
    def counts(self) -> dict[str, int]:
        """Devices by kind, as the metrics report them."""
        return {"GPU": len(self.gpus), "CPU": 1}

    def _gpus(self, indices: Sequence[int]) -> list[GpuDevice]:
        by_index = {gpu.index: gpu for gpu in self.gpus}
        return [by_index[index] for index in indices]

    def cuda_visible_devices(self, indices: Sequence[int]) -> str:
        """CUDA_VISIBLE_DEVICES for a worker given these GPUs ("" hides every GPU)."""
        return ",".join(gpu.visible_id for gpu in self._gpus(indices))

    def device_names(self, indices: Sequence[int]) -> tuple[str, ...]:
        """The host's names of these GPUs in order; ("CPU:0",) for none."""
        return tuple(gpu.name for gpu in self._gpus(indices)) or ("CPU:0",)


def child_cuda_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What a process that may initialise CUDA (the probe, a worker) adds to its environment.

    PCI bus order, nvidia-smi's numbering, unless the server's environment
    names an order; either way the probe and the workers count alike.
    """
    return {"CUDA_DEVICE_ORDER": environ.get("CUDA_DEVICE_ORDER") or "PCI_BUS_ID"}


def cpu_description() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def fake_gpus(count: int, memory_bytes: int = 16 * 1024**3) -> tuple[GpuDevice, ...]:
    """An inventory of `count` identical GPUs, for tests and benchmarks."""
    return tuple(
        GpuDevice(
            index=i,
            memory_bytes=memory_bytes,
            description="configured",
            cuda_id=str(i),
            host_name=f"GPU:{i}",
        )
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
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **child_cuda_env())
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


@dataclass(frozen=True)
class SmiDevice:
    """A GPU or MIG device as nvidia-smi lists it."""

    name: str  # the host's name for it: "GPU:3", "GPU:0/MIG:1"
    uuid: str  # "GPU-..." or "MIG-..."
    memory_bytes: int
    description: str


_SMI_GPU = re.compile(r"^GPU (\d+): (.*?) \(UUID: (GPU-[^)]+)\)")
_SMI_MIG = re.compile(r"^\s+MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[^)]+)\)")


def parse_nvidia_smi(listing: str, memory_csv: str) -> dict[str, SmiDevice]:
    """nvidia-smi's devices by every token CUDA_VISIBLE_DEVICES may name them with.

    Args:
        listing: `nvidia-smi -L`: GPUs with their UUIDs, MIG devices under them.
        memory_csv: `nvidia-smi --query-gpu=index,memory.total --format=csv,noheader,nounits`.

    Returns:
        Keys: the index ("3"), the UUID, and for MIG devices their MIG UUID.
        A MIG device's memory is its profile's (1g.10gb: 10 GB).
    """
    memory = {}
    for line in memory_csv.strip().splitlines():
        index, mebibytes = (part.strip() for part in line.split(",", 1))
        memory[index] = int(float(mebibytes)) * 1024**2
    found: dict[str, SmiDevice] = {}
    gpu = None
    for line in listing.splitlines():
        if match := _SMI_GPU.match(line):
            index, description, uuid = match.groups()
            gpu = SmiDevice(f"GPU:{index}", uuid, memory.get(index, 0), description)
            found[index] = found[uuid] = gpu
        elif (match := _SMI_MIG.match(line)) and gpu is not None:
            profile, device, uuid = match.groups()
            size = re.search(r"(\d+)gb", profile)
            found[uuid] = SmiDevice(
                f"{gpu.name}/MIG:{device}",
                uuid,
                int(size.group(1)) * 1000**3 if size else 0,
                f"{gpu.description} MIG {profile}",
            )
    return found


def identify_gpus(visible: str | None, count: int, smi: Mapping[str, SmiDevice]) -> list[GpuDevice]:
    """The server's GPUs: `count` of them, as TensorFlow found them in its child.

    Args:
        visible: the server's CUDA_VISIBLE_DEVICES; None when unset (every GPU,
            in PCI bus order).
        smi: `parse_nvidia_smi`'s answer, empty without nvidia-smi.

    A token is passed on to workers as it is; it is matched to nvidia-smi by
    index, by UUID or a prefix of one (CUDA accepts prefixes), or by MIG UUID.
    """
    tokens = [str(i) for i in range(count)] if visible is None else visible.split(",")
    gpus = []
    for position in range(count):
        token = tokens[position].strip() if position < len(tokens) else str(position)
        device = smi.get(token) or next(
            (d for key, d in smi.items() if key.startswith("GPU-") and key.startswith(token)),
            None,
        )
        if device is None:
            name = f"GPU:{token}" if token.isdigit() else token
            device = SmiDevice(name, "", 0, "")
        gpus.append(
            GpuDevice(
                index=position,
                memory_bytes=device.memory_bytes,
                description=device.description,
                cuda_id=token,
                host_name=device.name,
            )
        )
    return gpus


def _nvidia_smi() -> dict[str, SmiDevice]:
    """nvidia-smi's devices (see `parse_nvidia_smi`), or none when it is not installed."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        listing, memory = (
            subprocess.run(
                ["nvidia-smi", *arguments], capture_output=True, text=True, timeout=30, check=True
            ).stdout
            for arguments in (
                ["-L"],
                ["--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
            )
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_nvidia_smi(listing, memory)


def _probe_in_this_process() -> dict:
    import tensorflow as tf

    found = tf.config.list_physical_devices("GPU")
    gpus = identify_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), len(found), _nvidia_smi())
    for position, device in enumerate(found):
        if not gpus[position].description:
            details = tf.config.experimental.get_device_details(device)
            gpus[position] = GpuDevice(
                **{**asdict(gpus[position]), "description": details.get("device_name", "")}
            )
    return {"gpus": [asdict(gpu) for gpu in gpus], "tensorflow_version": tf.__version__}


if __name__ == "__main__":
    print(json.dumps(_probe_in_this_process()))
