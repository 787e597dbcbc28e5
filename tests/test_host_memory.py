"""Admission plans with the container's memory limit, not the host's physical memory.

A fake cgroup tree and /proc/self/cgroup stand in for the kernel's, for cgroup
v2 (`memory.max`) and v1 (`memory.limit_in_bytes`).
"""

from __future__ import annotations

import os

import pytest

from naive_model.npz import cgroup_memory_limit, host_memory_bytes
from service.jobs import validation

GIB = 1024**3
PHYSICAL = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_of_the_process_or_an_ancestor_is_the_memory(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "cgroup.proc"
    proc.write_text("0::/system.slice/trainer.service\n")
    _write(root / "system.slice/trainer.service/memory.max", "max\n")
    _write(root / "system.slice/memory.max", f"{3 * GIB + GIB // 2}\n")  # 3.5 GiB
    assert cgroup_memory_limit(root, proc) == 3.5 * GIB
    assert host_memory_bytes(root, proc) == min(PHYSICAL, int(3.5 * GIB))
    # In a container the own cgroup is the root of the tree.
    (root / "system.slice/memory.max").unlink()
    _write(root / "memory.max", f"{GIB}\n")
    assert host_memory_bytes(root, proc) == min(PHYSICAL, GIB)


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "cgroup.proc"
    proc.write_text("5:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\n")
    _write(root / "memory/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "none"
    assert host_memory_bytes(root, proc) == PHYSICAL
    _write(root / "memory/docker/abc/memory.limit_in_bytes", f"{2 * GIB}\n")
    assert host_memory_bytes(root, proc) == min(PHYSICAL, 2 * GIB)
    # Neither version's files (a platform without cgroups): physical memory.
    assert cgroup_memory_limit(tmp_path / "none", tmp_path / "missing") is None
    assert host_memory_bytes(tmp_path / "none", tmp_path / "missing") == PHYSICAL


def test_a_limit_above_physical_memory_changes_nothing(tmp_path):
    root, proc = tmp_path / "cgroup", tmp_path / "cgroup.proc"
    proc.write_text("0::/\n")
    _write(root / "memory.max", f"{PHYSICAL * 4}\n")
    assert host_memory_bytes(root, proc) == PHYSICAL


def test_admission_refuses_a_job_that_fits_the_host_but_not_the_container(tmp_path, monkeypatch):
    import naive_model.npz as npz
    from naive_model.config import LayerSpec, TrainConfig
    from service.jobs.errors import FailedPrecondition
    from service.protocol import JobSpec

    root, proc = tmp_path / "cgroup", tmp_path / "cgroup.proc"
    proc.write_text("0::/\n")
    _write(root / "memory.max", f"{GIB // 2}\n")  # a 512 MiB container
    monkeypatch.setattr(npz, "CGROUP_ROOT", root)
    monkeypatch.setattr(npz, "PROC_SELF_CGROUP", proc)
    layers = (LayerSpec(units=64, activation="relu"), LayerSpec(units=10, activation="softmax"))
    spec = JobSpec(train=TrainConfig(layers=layers), dataset="synthetic", strategy="cpu")
    # The smallest job needs more than TensorFlow's runtime (768 MiB): not in 512 MiB.
    with pytest.raises(FailedPrecondition, match=r"75% of this host's 0.5 GiB"):
        validation.validate_job_spec(spec, data_dir=None, host_gpus=0)
