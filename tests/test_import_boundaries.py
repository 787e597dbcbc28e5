"""Each stage imports only what is below it, and each process only what it needs.

    client (service.cli) -> service.api -> service.jobs -> service.processes
        | (a socket pair)
    service.worker (inside a worker process) -> naive_model

The static part reads every module's imports (function-level ones too); the
process part imports the real entry points in fresh interpreters, and looks
at a live worker's memory map while it trains.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from ntrain.v1 import training_pb2 as pb
from service_harness import RunningServer, child_worker_pids, job_spec

# What each package may import from this project (beyond itself).
ALLOWED = {
    "naive_model": set(),
    "service.protocol": {"naive_model.config", "naive_model.results"},
    "service.worker": {"service.protocol", "naive_model"},
    # The server's side of worker processes: starts, feeds and reaps them.
    "service.processes": {"service.protocol", "naive_model.config"},
    # The Ray job of a multi_worker job: runs on the cluster, imports ray and TensorFlow.
    "service.driver": {"service.protocol", "naive_model"},
    "service.jobs": {"service.protocol", "service.processes", "service.devices", "naive_model"},
    "service.metrics": {"service.protocol"},
    "service.devices": set(),
    "service.metrics_http": set(),
    "service.api": {
        "service.protocol",
        "service.jobs",
        "service.metrics",
        "service.metrics_http",
        "service.devices",
        "naive_model.config",
        "naive_model.data",
        "ntrain",
    },
    "service.cli": {
        "service.protocol",
        "service.api",
        # `ntrain store check|repair|backup` work on a state directory, not a server.
        "service.jobs.reconcile",
        "service.jobs.lock",
        "naive_model.config",
        "naive_model.data",
        "naive_model.results",  # a result's words, as the training log says them
        "ntrain",
    },
    "service.protogen": set(),
    "service": set(),  # the package itself (an empty __init__)
}
PROJECT = ("naive_model", "service", "ntrain")
THIRD_PARTY_BANNED = {
    "naive_model": {"grpc", "prometheus_client", "google.protobuf", "optuna"},
    "service.protocol": {"grpc", "google.protobuf", "tensorflow", "numpy"},
    # Experiments' search (Optuna) runs in the server only, never in a worker.
    "service.worker": {"grpc", "google.protobuf", "prometheus_client", "optuna"},
    "service.processes": {"grpc", "google.protobuf", "prometheus_client", "tensorflow", "numpy"},
    "service.driver": {"grpc", "google.protobuf", "prometheus_client", "optuna"},
    # The server talks to Ray Jobs over plain HTTP.
    "service.jobs": {"grpc", "google.protobuf", "tensorflow", "prometheus_client", "ray"},
    "service.api": {"tensorflow", "ray"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _stage(module: str) -> str:
    for stage in sorted(ALLOWED, key=len, reverse=True):
        if module == stage or module.startswith(stage + "."):
            return stage
    raise AssertionError(f"{module} belongs to no stage: add it to ALLOWED")


def _within(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_no_module_imports_up_the_stages():
    violations = []
    for path in sorted(
        [*REPO_ROOT.glob("naive_model/**/*.py"), *REPO_ROOT.glob("service/**/*.py")]
    ):
        module = _module_name(path)
        stage = _stage(module)
        for name in _imports(path):
            if name.startswith(PROJECT) and not _within(name, {stage} | ALLOWED[stage]):
                # `from service.jobs import errors` names a module of the package itself.
                if not _within(name.rsplit(".", 1)[0], {stage}):
                    violations.append(f"{module} imports {name}")
            banned = THIRD_PARTY_BANNED.get(stage, set())
            if _within(name, banned):
                violations.append(f"{module} imports {name}")
    assert violations == []


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
        env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def _loaded(modules: set[str], top: str) -> bool:
    return any(name == top or name.startswith(top + ".") for name in modules)


def test_the_server_process_imports_no_tensorflow():
    modules = _modules_after(
        "from pathlib import Path; import tempfile\n"
        "from service.api.server import ServerConfig, TrainingServer\n"
        "import service.cli.app\n"
        "with tempfile.TemporaryDirectory() as state:\n"
        "    server = TrainingServer(ServerConfig(port=0, metrics_port=0, warm_worker=False,"
        " gpu_inventory=(), state_dir=Path(state)))\n"
        "    server.start(); server.stop(grace=0)"
    )
    print("server process:", len(modules), "modules; grpc:", _loaded(modules, "grpc"))
    assert _loaded(modules, "grpc") and _loaded(modules, "service.api")
    assert not _loaded(modules, "tensorflow") and not _loaded(modules, "keras")


@pytest.mark.slow  # imports TensorFlow in a fresh interpreter
def test_the_library_imports_no_service_code():
    modules = _modules_after(
        "import naive_model, naive_model.loop, naive_model.trainer, naive_model.export\n"
        "import naive_model.eager, naive_model.distribute"
    )
    assert _loaded(modules, "tensorflow")
    for banned in ("grpc", "prometheus_client", "service", "ntrain"):
        assert not _loaded(modules, banned), banned


@pytest.mark.slow  # imports TensorFlow in a fresh interpreter
def test_the_worker_imports_no_grpc_nor_generated_protobuf_code():
    modules = _modules_after(
        "import sys; sys.argv = ['worker']\n"
        "import service.worker.entry, service.worker.tasks, service.worker.serving\n"
        "service.worker.tasks.import_tensorflow()"
    )
    assert _loaded(modules, "tensorflow")
    # TensorFlow itself uses google.protobuf for its own messages; the worker
    # never loads gRPC, ntrain's generated code, or the server's stages.
    for banned in ("grpc", "ntrain", "prometheus_client", "service.api", "service.jobs", "optuna"):
        assert not _loaded(modules, banned), banned
    print("worker process:", len(modules), "modules, none of grpc, ntrain.v1, service.api/jobs")


@pytest.mark.slow
def test_a_live_worker_has_no_grpc_library_mapped(tmp_path):
    """The worker of a real server, mid-training, has loaded neither gRPC's C core nor sklearn."""
    server = RunningServer(tmp_path, warm_worker=False)
    try:
        job = server.submit(job_spec(epochs=100_000))
        for event in server.stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=120):
            if event.HasField("progress"):
                break
        deadline = time.monotonic() + 30
        while not child_worker_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        (worker,) = child_worker_pids()
        maps = Path(f"/proc/{worker}/maps").read_text()
        assert "_pywrap_tensorflow" in maps  # it is training: TensorFlow is loaded
        assert "cygrpc" not in maps and "grpc/_cython" not in maps
        # Nor scikit-learn, which Keras would import for its wrappers (a second of its start).
        assert "/sklearn/" not in maps
        server.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=60)
    finally:
        server.stop()


def test_no_two_modules_share_a_name():
    """A module's name says which one it is, wherever it is imported from."""
    packages = ("naive_model", "service", "ntrain")
    seen: dict[str, list[str]] = {}
    for package in packages:
        for path in (REPO_ROOT / package).rglob("*.py"):
            if path.stem not in ("__init__", "__main__"):
                seen.setdefault(path.stem, []).append(str(path.relative_to(REPO_ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}
