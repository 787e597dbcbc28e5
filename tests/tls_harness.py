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


def self_signed(directory: Path, *, start: str, end: str) -> TlsFiles:
    """A self-signed certificate valid from `start` to `end` (YYYYMMDDHHMMSSZ), and its key.

    `openssl ca` sets both dates (`openssl x509` of OpenSSL 3.0 sets only a
    number of days from now), from a throwaway CA database in `directory`.
    """
    openssl = require_tool("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("01\n")
    (directory / "ca.cnf").write_text(
        "[ca]\ndefault_ca = ca\n[ca]\ndatabase = index.txt\nnew_certs_dir = .\n"
        "serial = serial\ndefault_md = sha256\npolicy = policy\n"
        "[policy]\ncommonName = supplied\n"
    )

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=directory)

    run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "key.pem")
    run("req", "-new", "-key", "key.pem", "-subj", "/CN=localhost", "-out", "csr.pem")
    run("ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "key.pem",
        "-in", "csr.pem", "-out", "cert.pem", "-startdate", start, "-enddate", end)  # fmt: skip
    return TlsFiles(cert=directory / "cert.pem", key=directory / "key.pem")
