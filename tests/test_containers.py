"""The container stack: its build context, its NCCL settings, and the CI check that runs it.

`.ci/containers.sh` (run by .ci/run before `make test`) builds the image on a
stand-in TensorFlow base, runs the compose stack under its own dockerd and
writes build/containers/result.json; the last test here makes that run part of
the suite's record. Without the file it skips on a laptop and fails in CI.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from conftest import IN_CI, REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
RESULT = REPO_ROOT / "build" / "containers" / "result.json"
# Every check the issue asks for; the script may add more, never drop one.
REQUIRED_CHECKS = {
    "build deploy/Dockerfile on the stand-in",
    "compose files valid (docker compose config -q)",
    "compose up trainer prometheus (CPU override)",
    "trainer healthy",
    "published ports on 127.0.0.1 only",
    "trainer shm_size and ulimits for NCCL",
    "prometheus scrapes the trainer (target up)",
    "prometheus loaded the alert rules",
    "synthetic job through 127.0.0.1:50051",
    "down -v left nothing",
    "without the CPU override, up fails naming the nvidia driver",
    "stop dockerd",
}


def test_one_dockerignore_sends_the_context():
    """The root .dockerignore alone: BuildKit would read a Dockerfile's own ignore file first."""
    assert (REPO_ROOT / ".dockerignore").is_file()
    assert not list(DEPLOY.rglob("*.dockerignore")), "a Dockerfile's own ignore file would win"


def test_the_trainer_has_the_shared_and_locked_memory_nccl_needs():
    trainer = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["trainer"]
    assert trainer["shm_size"] == "8gb"
    assert trainer["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert "ipc" not in trainer  # a private /dev/shm; see the comment in the compose file


def test_the_image_numbers_gpus_by_pci_bus_and_runs_as_a_numeric_user():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^\s+CUDA_DEVICE_ORDER=PCI_BUS_ID\s*$", text, flags=re.M)
    uid = re.search(r"^ARG NTRAIN_UID=(\d+)$", text, flags=re.M).group(1)
    (user,) = re.findall(r"^USER\s+(\S+)$", text, flags=re.M)
    assert user.replace("${NTRAIN_UID}", uid) == f"{uid}:{uid}" and uid != "0"


def _skip_or_fail(message: str):
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def test_the_container_stack_passed_its_ci_check():
    """Every check of the last .ci/containers.sh run passed, and it ran on this commit."""
    if not RESULT.exists():
        _skip_or_fail(f"{RESULT.relative_to(REPO_ROOT)} is missing: run .ci/containers.sh as root")
    result = json.loads(RESULT.read_text())
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    if head and result["commit"] != head:
        _skip_or_fail(f"the container check ran on {result['commit']}, not on HEAD {head}")
    checks = {check["name"]: check for check in result["checks"]}
    assert REQUIRED_CHECKS <= set(checks), f"checks missing: {REQUIRED_CHECKS - set(checks)}"
    failed = [f"{c['name']}: {c['detail']}" for c in result["checks"] if not c["passed"]]
    assert not failed, "container checks failed (build/containers/transcript.log):\n" + "\n".join(
        failed
    )
    assert result["passed"]
