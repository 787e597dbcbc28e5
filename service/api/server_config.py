"""How the server is configured, and the checks a configuration must pass to start.

The checks run before the state directory or a port is touched, each refusing
with one line: ports in range and free, a data directory that is one, and no
address beyond loopback without TLS and authentication (unless `insecure`).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from service.api.streams import MAX_AGE_SECONDS, SEND_TIMEOUT_SECONDS
from service.api.tls import TlsFiles
from service.devices import GpuDevice
from service.jobs.controller import (
    HANG_SECONDS,
    MIN_RUN_SECONDS,
    PREEMPTION_GRACE_SECONDS,
    PROGRESS_INTERVAL_SECONDS,
)
from service.jobs.dataset_uploads import DEFAULT_MAX_DATASET_BYTES
from service.jobs.model_tasks import DEFAULT_MAX_TASKS, DEFAULT_MODEL_CACHE
from service.jobs.scheduler import AUTO_GPU_WAIT_SECONDS, BACKFILL_SECONDS


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How to run the server.

    port, metrics_port: 0 picks a free port; metrics_port None serves no metrics.
    gpu_inventory: the GPUs to schedule on; None probes the host.
    tls, auth_tokens: TLS for the gRPC port, and the token file of its principals
        (None: every caller is the anonymous local admin).
    metrics_tls, metrics_basic_auth: the same for the metrics endpoint.
    insecure: serve on an address other than loopback without all of those.
    max_streams, max_streams_per_principal: WatchJob, GetJobLogs and DownloadModel
        streams open at once, and of one principal (service.api.streams).
    stream_send_timeout_seconds: a stream whose client has not taken a message
        for this long is dropped.
    stream_max_age_seconds: a resumable stream (WatchJob, a followed GetJobLogs,
        WatchExperiment) ends UNAVAILABLE for renewal after this and a random
        part more (0: never), so a client that stopped reading is dropped
        whatever its window.
    ray_address: Ray Jobs' address (http://HOST:8265) for multi_worker jobs;
        None refuses them. ray_token_file: the token of Ray's token auth mode.
    mlflow_tracking_uri: an MLflow tracking server (http://HOST:PORT) that gets one
        run per job (service.jobs.tracking); None tracks nothing.
    """

    bind_address: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9101
    state_dir: Path = Path("var")
    data_dir: Path | None = None
    # The largest data set file UploadDataset takes.
    max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES
    # A job's training split past this many bytes is streamed (data_mode auto);
    # 0: half the host's memory, as admission sees it.
    data_budget_bytes: int = 0
    max_queue: int = 64
    max_queue_per_principal: int = 32  # with authentication: one principal's share of it
    max_cpu_jobs: int = 1
    max_model_tasks: int = DEFAULT_MAX_TASKS
    model_cache: int = DEFAULT_MODEL_CACHE  # models the inference worker keeps loaded
    jobs_per_gpu: int = 1
    backfill_seconds: float = BACKFILL_SECONDS
    auto_gpu_wait_seconds: float = AUTO_GPU_WAIT_SECONDS
    preemption_grace_seconds: float = PREEMPTION_GRACE_SECONDS
    min_run_seconds: float = MIN_RUN_SECONDS
    hang_seconds: float = HANG_SECONDS
    progress_interval_seconds: float = PROGRESS_INTERVAL_SECONDS
    warm_worker: bool = True
    gpu_inventory: tuple[GpuDevice, ...] | None = None
    job_series_retention_seconds: float = 600.0
    tls: TlsFiles | None = None
    auth_tokens: Path | None = None
    reflection: bool = True
    metrics_tls: TlsFiles | None = None
    metrics_basic_auth: Path | None = None
    insecure: bool = False
    checkpoint_seconds: float = 300.0
    shutdown_grace_seconds: float = 30.0
    max_streams: int = 512
    max_streams_per_principal: int = 128  # at most max_streams
    stream_send_timeout_seconds: float = SEND_TIMEOUT_SECONDS
    stream_max_age_seconds: float = MAX_AGE_SECONDS
    ray_address: str | None = None
    ray_token_file: Path | None = None
    mlflow_tracking_uri: str | None = None


def is_loopback(address: str) -> bool:
    """Whether `address` reaches this host only (127.0.0.0/8, ::1, localhost)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def exposure_problem(config: ServerConfig) -> str | None:
    """Why serving `config` would expose the service by accident, or None.

    Loopback is the trusted default; any other address needs TLS and
    authentication on the gRPC port and on the metrics endpoint, or `insecure`.
    """
    if config.insecure or is_loopback(config.bind_address):
        return None
    missing = []
    if config.tls is None:
        missing.append("TLS (--tls-cert, --tls-key)")
    if config.auth_tokens is None:
        missing.append("tokens (--auth-tokens)")
    if config.metrics_port is not None:
        if config.metrics_tls is None:
            missing.append("metrics TLS (--metrics-tls-cert, --metrics-tls-key)")
        if config.metrics_basic_auth is None:
            missing.append("metrics basic auth (--metrics-basic-auth)")
    if not missing:
        return None
    return (
        f"refusing to serve on {config.bind_address}, which is not loopback, without "
        f"{', '.join(missing)}: pass them, or --insecure to serve it open anyway"
    )


def check_config(config: ServerConfig) -> None:
    """Refuse, with one line, a config the server cannot start with.

    Runs before the state directory or a port is touched: the ports must be
    in range and free, and the data directory must be a directory. gRPC's
    C core would log its own line before our error for a taken port, and
    silencing it takes GRPC_VERBOSITY set before grpc is imported; asking
    the operating system first says it once, in our words. (A port taken in
    the instant between this check and the bind still fails, with that line.)

    Raises:
        ValueError: a port out of range, a data directory that is missing or
            not a directory, or an address (Ray's, MLflow's) that is no URL.
        RuntimeError: a port in use, or an address this host cannot bind.
    """
    ports = {"port": config.port}
    if config.metrics_port is not None:
        ports["metrics_port"] = config.metrics_port
    for name, port in ports.items():
        if not 0 <= port <= 65535:
            raise ValueError(f"{name} must be in 0..65535, got {port}")
    for name in ("max_streams", "max_streams_per_principal"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    timeout = config.stream_send_timeout_seconds
    if not timeout > 0:
        raise ValueError(f"stream_send_timeout_seconds must be positive, got {timeout}")
    if not config.stream_max_age_seconds >= 0:
        raise ValueError(
            f"stream_max_age_seconds must be 0 or more, got {config.stream_max_age_seconds}"
        )
    if config.ray_address is not None:
        parsed = urllib.parse.urlsplit(config.ray_address)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                f"ray address must be http://HOST:PORT (Ray Jobs), got {config.ray_address!r}"
            )
    if config.mlflow_tracking_uri is not None:
        parsed = urllib.parse.urlsplit(config.mlflow_tracking_uri)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                "mlflow tracking uri must be http://HOST:PORT (a tracking server), "
                f"got {config.mlflow_tracking_uri!r}"
            )
    if config.ray_token_file is not None and not config.ray_token_file.is_file():
        raise ValueError(f"ray token file {config.ray_token_file} is not a file")
    if config.data_dir is not None and not config.data_dir.is_dir():
        problem = "is not a directory" if config.data_dir.exists() else "does not exist"
        raise ValueError(f"data directory {config.data_dir} {problem}")
    for port in set(ports.values()) - {0}:
        _check_port_free(config.bind_address, port)


def _check_port_free(address: str, port: int) -> None:
    """Bind `address:port` as gRPC would (SO_REUSEADDR), and let it go again."""
    try:
        candidates = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise RuntimeError(f"cannot resolve the address {address!r}: {error.strerror}") from None
    for family, kind, protocol, _, where in candidates:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(where)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise RuntimeError(f"port {port} is in use on {address}") from None
                raise RuntimeError(
                    f"cannot listen on {host_port(address, port)}: {error.strerror}"
                ) from None


def host_port(address: str, port: int) -> str:
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"  # an IPv6 literal
    return f"{address}:{port}"
