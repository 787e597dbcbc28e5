"""benchmarks/load.py keeps working: a quick run reports every figure, with no errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_a_quick_load_run_reports_every_figure(tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--quick", "--rps", "20", "--watchers", "5",
         "--closed-threads", "2", "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [p["kind"] for p in result["phases"]] == [
        "idle", "unary", "watch", "load", "load", "watch", "unary", "idle"
    ]  # fmt: skip
    assert result["unary_errors"] == 0 and result["watch_errors"] == 0
    assert result["unary_calls"] == 2 * int(20 * 3.0)  # every planned call of the load phases
    assert result["watch_events"] > 0 and result["training_rate_idle"] > 0
    assert result["closed_loop"]["calls"] > 0 and result["server_cpu_ms_per_rpc"] > 0
    assert set(result["met"]) == {"cpu_ms_per_rpc", "p99_ms", "no_errors", "training_drop"}
    assert "server CPU per unary RPC" in done.stdout


def test_the_server_cost_comparison_runs_each_kind_of_server():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.grpc_server_cost", "--seconds", "1", "--rounds", "1",
         "--processes", "1", "--threads", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split(":")[0].strip() for line in done.stdout.splitlines()]
    assert rows == ["sync", "aio", "aio-migrated"]
    assert "(0 errors)" in done.stdout and done.stdout.count("(0 errors)") == 3
