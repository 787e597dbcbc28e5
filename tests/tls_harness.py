"""Certificates, tokens and a metrics password for tests, made by deploy/make-certs.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from conftest import REPO_ROOT, require_tool

from service.api.tls import TlsFiles

MAKE_CERTS = REPO_ROOT / "deploy" / "make-certs.sh"
ROLES = ("admin", "trainer", "viewer")


def run_make_certs(directory: Path) -> subprocess.CompletedProcess:
    """deploy/make-certs.sh DIRECTORY, with this interpreter's ntrain (openssl must exist)."""
    require_tool("openssl")
    env = {**os.environ, "NTRAIN": f"{sys.executable} -m service.cli"}
    return subprocess.run(
        ["bash", str(MAKE_CERTS), str(directory)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )


def make_pki(directory: Path) -> SimpleNamespace:
    """A private CA, server and client certificates, tokens and a metrics password."""
    run_make_certs(directory)

    def read(name: str) -> bytes:
        return (directory / name).read_bytes()

    return SimpleNamespace(
        dir=directory,
        ca=read("ca.crt"),
        client_cert=read("client.crt"),
        client_key=read("client.key"),
        server=TlsFiles(cert=directory / "server.crt", key=directory / "server.key"),
        tokens=directory / "tokens",
        token={role: read(f"{role}.token").decode().strip() for role in ROLES},
        metrics_users=directory / "metrics-users",
        metrics_password=read("metrics.password").decode().strip(),
    )
