"""The server's lifecycle: build everything, serve, and stop gracefully.

`TrainingServer` wires the store, the device inventory, the job manager, the
TrainingService, the standard health service and server reflection, the
interceptors (metrics, then errors to status codes, then authentication) and
the Prometheus endpoint. This process never imports TensorFlow: devices are
probed in a child process and jobs run in worker processes.

Security: with `tls` the port serves TLS (mutual TLS with a client CA), with
`auth_tokens` every call but health needs a bearer token, and `reload()` (on
SIGHUP) re-reads certificates, tokens and the metrics password file without
stopping a job. A server on an address other than loopback refuses to start
without TLS and authentication on both ports unless `insecure` is set.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ntrain.v1 import training_pb2, training_pb2_grpc

from service.api.auth import AuthInterceptor, PasswordTable, PeerFailures, TokenTable
from service.api.grpc_metrics import MetricsServerInterceptor
from service.api.server_config import (  # noqa: F401 - ServerConfig is this module's API too
    ServerConfig,
    check_config,
    exposure_problem,
    host_port,
    is_loopback,
)
from service.api.servicer import TrainingServicer
from service.api.status_codes import ExceptionToStatusInterceptor
from service.api.streams import StreamSlots
from service.api.tls import ReloadableGrpcCredentials, ReloadableSslContext, TlsFiles
from service.devices import DeviceInventory, cpu_description, probe_devices
from service.jobs.controller import JobObserver
from service.jobs.dataset_store import DatasetStore
from service.jobs.dataset_uploads import DatasetUploads
from service.jobs.experiments import ExperimentManager
from service.jobs.lock import StateDirLock
from service.jobs.manager import JobManager
from service.jobs.ray_jobs import RayJobsClient
from service.jobs.reconcile import open_checked
from service.jobs.server_status import package_version
from service.jobs.store import Store
from service.jobs.tracking import MlflowTracker, TrackingObserver
from service.metrics import ServiceMetrics
from service.metrics_http import MetricsHttpServer, start_metrics_server

log = logging.getLogger(__name__)

# How long a stopping server lets the MLflow tracker send what it has queued.
TRACKER_CLOSE_SECONDS = 10.0

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
# Threads for unary RPCs; each open WatchJob stream holds a thread of its own
# on top of these (ServerConfig.max_streams), so streams cannot starve them.
UNARY_THREADS = 32
HOUSEKEEPING_SECONDS = 2.0  # warm-worker gauge and expired per-job series
# Jobs that hold on to their data set: a version they use cannot be deleted.


class TrainingServer:
    """The gRPC server and everything behind it."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.port: int = 0
        self.metrics_port: int | None = None
        self.manager: JobManager | None = None
        self.experiments: ExperimentManager | None = None
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._metrics_http: MetricsHttpServer | None = None
        self._store: Store | None = None
        self._datasets: DatasetStore | None = None
        self._lock: StateDirLock | None = None
        self._stopped = threading.Event()
        self._housekeeping: threading.Thread | None = None
        self._credentials: ReloadableGrpcCredentials | None = None
        self._metrics_ssl: ReloadableSslContext | None = None
        self._tokens: TokenTable | None = None
        self._passwords: PasswordTable | None = None
        self._tracker: MlflowTracker | None = None
        self._token_failures = PeerFailures("call")
        self._metrics_failures = PeerFailures("metrics login")
        self.streams: StreamSlots | None = None

    def start(self) -> None:
        """Open the state, find the devices, and start serving on the configured ports.

        On failure (a port in use, an unreadable state dir) whatever had started
        is stopped again before the error propagates.
        """
        try:
            self._start()
        except BaseException:
            self.stop(grace=0.0)
            raise

    def _start(self) -> None:
        config = self.config
        check_config(config)
        problem = exposure_problem(config)
        if problem is not None:
            raise ValueError(problem)
        # Read every secret first: a bad file stops the start before anything runs.
        if config.auth_tokens is not None:
            self._tokens = TokenTable.load(config.auth_tokens)
        if config.metrics_basic_auth is not None:
            self._passwords = PasswordTable.load(config.metrics_basic_auth)
        if config.tls is not None:
            self._credentials = ReloadableGrpcCredentials(config.tls)
        if config.metrics_tls is not None:
            self._metrics_ssl = ReloadableSslContext(config.metrics_tls)
        # Before anything touches the directory: one server owns it.
        self._lock = StateDirLock(config.state_dir)
        self._lock.acquire()
        # Checked against the job folders' journals; rebuilt where that loses nothing.
        self._store = open_checked(config.state_dir)
        if config.gpu_inventory is None:
            inventory = probe_devices()
        else:
            inventory = DeviceInventory(
                gpus=tuple(config.gpu_inventory), cpu_description=cpu_description()
            )
        self.metrics = ServiceMetrics(
            job_series_retention_seconds=config.job_series_retention_seconds
        )
        self.metrics.set_build_info(
            version=package_version("ntrain"),
            tensorflow_version=package_version("tensorflow"),
            python_version=platform.python_version(),
        )
        self.metrics.set_devices(inventory.counts)
        # Who uses a version is the jobs' business: the manager answers, in its loop.
        self._datasets = DatasetStore(
            config.state_dir, users_of=lambda digest: self._jobs().jobs_using(digest)
        )
        if config.mlflow_tracking_uri is not None:
            self._tracker = self._start_tracker(config.mlflow_tracking_uri, self._store)
        # Told of every trial's events by the job loop; started after it, below.
        self.experiments = ExperimentManager(
            config.state_dir,
            metrics=self.metrics,
            on_change=self._tracker.experiment_changed if self._tracker is not None else None,
        )
        observers: list[JobObserver] = [self.experiments]
        if self._tracker is not None:
            observers.append(TrackingObserver(self._tracker, self._store.exported_model))
        self.manager = JobManager(
            self._store,
            observers=observers,
            datasets=self._datasets,
            data_budget_bytes=config.data_budget_bytes,
            inventory=inventory,
            metrics=self.metrics,
            data_dir=config.data_dir,
            max_queue=config.max_queue,
            max_queue_per_owner=config.max_queue_per_principal,
            max_cpu_jobs=config.max_cpu_jobs,
            max_model_tasks=config.max_model_tasks,
            model_cache=config.model_cache,
            jobs_per_gpu=config.jobs_per_gpu,
            backfill_seconds=config.backfill_seconds,
            auto_gpu_wait_seconds=config.auto_gpu_wait_seconds,
            preemption_grace_seconds=config.preemption_grace_seconds,
            min_run_seconds=config.min_run_seconds,
            hang_seconds=config.hang_seconds,
            progress_interval_seconds=config.progress_interval_seconds,
            warm_worker=config.warm_worker,
            checkpoint_seconds=config.checkpoint_seconds,
            # Workers hold the state directory's lock too: see service.jobs.lock.
            worker_held_fds=(self._lock.fd,) if self._lock.fd is not None else (),
            ray=(
                RayJobsClient.from_token_file(config.ray_address, config.ray_token_file)
                if config.ray_address
                else None
            ),
        )

        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=config.max_streams + UNARY_THREADS, thread_name_prefix="rpc"
            ),
            interceptors=[
                MetricsServerInterceptor(self.metrics.registry),
                ExceptionToStatusInterceptor(),
                AuthInterceptor(lambda: self._tokens, self._token_failures),
            ],
            # A second server on a taken port must fail, not share it silently.
            options=[("grpc.so_reuseport", 0)],
        )
        uploads = DatasetUploads(self._datasets, max_bytes=config.max_dataset_bytes)
        self.streams = StreamSlots(
            config.max_streams,
            config.max_streams_per_principal,
            send_timeout=config.stream_send_timeout_seconds,
            max_age=config.stream_max_age_seconds,
        )
        training_pb2_grpc.add_TrainingServiceServicer_to_server(
            TrainingServicer(
                self.manager, uploads, streams=self.streams, experiments=self.experiments
            ),
            server,
        )
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if config.reflection:
            reflection.enable_server_reflection(
                (
                    SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                server,
            )
        address = host_port(config.bind_address, config.port)
        if self._credentials is not None:
            self.port = server.add_secure_port(address, self._credentials.credentials)
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {host_port(config.bind_address, config.port)}")
        self.manager.start()
        self.experiments.start(self.manager)
        server.start()
        self._server = server
        self.streams.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if config.metrics_port is not None:
            self._metrics_http, self.metrics_port = start_metrics_server(
                config.metrics_port,
                config.bind_address,
                self.metrics.registry,
                ssl_context=self._metrics_ssl,
                check_password=self._check_metrics_password if self._passwords else None,
            )
        self._housekeeping = threading.Thread(
            target=self._keep_house, name="housekeeping", daemon=True
        )
        self._housekeeping.start()
        transport = "plaintext" if config.tls is None else "TLS"
        if config.tls is not None and config.tls.client_ca is not None:
            transport += " with client certificates"
        principals = "no authentication" if self._tokens is None else f"{len(self._tokens)} tokens"
        log.info(
            "serving on %s (%s, %s)",
            host_port(config.bind_address, self.port),
            transport,
            principals,
        )

    def _jobs(self) -> JobManager:
        assert self.manager is not None  # the data sets are served after it is built
        return self.manager

    def _check_metrics_password(self, name: str, password: str, peer: str) -> bool:
        passwords = self._passwords
        if passwords is not None and passwords.check(name, password):
            return True
        # A user name from the file may be logged; anything else might be a password.
        who = f"user {name}" if passwords is not None and name in passwords else "an unknown user"
        self._metrics_failures.failed(peer, f"wrong password for {who}")
        return False

    def reload(self) -> list[str]:
        """Re-read the certificates, the token file and the metrics password file.

        Each is replaced only when it reads cleanly; new connections and calls
        use it, and running jobs and open streams go on. Returns a line for each
        that could not be read (and was kept as it was).
        """
        config, problems = self.config, []
        # (what, re-read it, its TLS files): a certificate that is expired, not yet
        # valid, not its key's or without a name the one in use has is refused
        # (TlsFiles.ssl_context), since new handshakes would fail with it.
        steps: list[tuple[str, Callable[[], None], TlsFiles | None]] = []
        if self._credentials is not None:
            credentials = self._credentials
            steps.append(("TLS certificate", credentials.reload, credentials.files))
        if self._metrics_ssl is not None:
            metrics_ssl = self._metrics_ssl
            steps.append(("metrics TLS certificate", metrics_ssl.reload, metrics_ssl.files))
        if config.auth_tokens is not None:
            path = config.auth_tokens
            steps.append(("tokens", lambda: setattr(self, "_tokens", TokenTable.load(path)), None))
        if config.metrics_basic_auth is not None:
            users = config.metrics_basic_auth
            steps.append(
                (
                    "metrics users",
                    lambda: setattr(self, "_passwords", PasswordTable.load(users)),
                    None,
                )
            )
        for what, step, files in steps:
            try:
                step()
                until = files.valid_until() if files is not None else None
                valid = "" if until is None else f" (valid until {until:%Y-%m-%d})"
                log.info("reloaded the %s%s", what, valid)
            except ValueError as error:
                problems.append(f"kept the old {what}: {error}")
                log.error("kept the old %s: %s", what, error)
        return problems

    def _start_tracker(self, uri: str, store: Store) -> MlflowTracker:
        """One MLflow run per job; a failed log is a line in the job's log and a count."""

        def on_failure(job_id: str, message: str) -> None:
            # From the tracker's thread, or the loop's when its queue is full: never waits.
            self.metrics.mlflow_log_failed()
            if not store.job_dir(job_id).is_dir():  # an experiment's run: no job log
                log.warning("%s: %s", job_id, message)
                return
            try:
                with open(store.job_files(job_id).train_log, "a") as job_log:
                    job_log.write(f"{time.strftime('%H:%M:%S')} server: {message}\n")
            except OSError:
                log.warning("job %s: %s", job_id, message)

        return MlflowTracker(uri, on_failure=on_failure, job_dir=store.job_dir)

    def _keep_house(self) -> None:
        assert self.manager is not None  # started after the manager
        while not self._stopped.wait(HOUSEKEEPING_SECONDS):
            self.metrics.remove_expired_job_series()
            self.metrics.set_warm_workers(self.manager.pool.warm_ready)

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving: running jobs checkpoint and resume on the next start.

        Args:
            grace: seconds open RPCs get to finish. Running workers get the
                config's shutdown_grace_seconds to save a checkpoint.
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self.experiments is not None:  # first: no trial is submitted as jobs stop
            self.experiments.stop()
        if self.manager is not None:
            self.manager.shutdown(self.config.shutdown_grace_seconds)
        if self._tracker is not None and not self._tracker.close(TRACKER_CLOSE_SECONDS):
            log.warning("MLflow: events queued for %.0f s were not sent", TRACKER_CLOSE_SECONDS)
        if self._server is not None:
            self._server.stop(grace).wait()
        if self.streams is not None:
            self.streams.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        if self._store is not None:
            self._store.close()
        if self._datasets is not None:
            self._datasets.close()
        if self._lock is not None:
            self._lock.release()

    def wait_for_termination(self) -> None:
        self._stopped.wait()


def serve(
    config: ServerConfig,
    *,
    on_ready: Callable[[TrainingServer], None] = lambda server: None,
    on_stopping: Callable[[str], None] = lambda why: None,
    parent_pid: int | None = None,
) -> None:
    """Run a server until SIGTERM or SIGINT, then stop it gracefully; SIGHUP reloads.

    The process's umask becomes 077 first, so the state directory's files and
    every worker's (workers inherit it) are readable by this user only.

    Args:
        on_ready: called once the server listens (to announce it, write a port file).
        on_stopping: called with why (a signal came, the parent ended) before the server stops.
        parent_pid: stop, as on SIGTERM, once this process is no longer the parent
            (it ended: this one was handed to init or a subreaper).

    Raises:
        Exception: the server could not start; whatever had started is stopped.
    """
    os.umask(0o077)
    server = TrainingServer(config)
    stop, reload = threading.Event(), threading.Event()
    why = ""

    def on_signal(signum: int, frame: object) -> None:
        nonlocal why
        why = signal.Signals(signum).name
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    try:
        server.start()
        on_ready(server)
        while not stop.wait(0.5):  # a short wait keeps signal handling prompt
            if reload.is_set():
                reload.clear()
                server.reload()
            if parent_pid is not None and os.getppid() != parent_pid:
                why = f"the process that started it ({parent_pid}) ended"
                break
        on_stopping(why)
    finally:
        server.stop()
