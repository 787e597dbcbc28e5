"""The committed generated code equals a fresh `make proto` (python -m service.protogen)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATED_DIR = REPO_ROOT / "proto" / "ntrain" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_committed_generated_code_matches_a_fresh_generation(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "service.protogen", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        check=True,
        timeout=120,
    )
    fresh = {
        path.relative_to(tmp_path): path.read_text()
        for path in (tmp_path / "ntrain" / "v1").iterdir()
        if path.name.endswith(SUFFIXES)
    }
    committed = {
        path.relative_to(REPO_ROOT / "proto"): path.read_text()
        for path in GENERATED_DIR.iterdir()
        if path.name.endswith(SUFFIXES)
    }
    assert sorted(fresh) == sorted(committed), "generated files differ in name: run `make proto`"
    stale = [str(name) for name in committed if committed[name] != fresh[name]]
    assert not stale, f"{stale} differ from a fresh generation: run `make proto` and commit"
    protos = {p.stem for p in GENERATED_DIR.glob("*.proto")}
    assert {str(name).split("/")[-1].split("_pb2")[0] for name in committed} == protos
