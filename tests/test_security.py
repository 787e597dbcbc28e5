"""Attacks on a real server over real TLS, and what each gets back.

Certificates and tokens come from deploy/make-certs.sh (openssl, and
`ntrain token` for the hashes), run twice for two unrelated CAs. Servers bind
127.0.0.1 only. The in-process server has TLS, tokens, and a metrics endpoint
with TLS and basic auth; a second one asks for client certificates; the last
test runs `ntrain serve` in a child process to reload certificates on SIGHUP
under a running job and to read its log for tokens.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import logging
import os
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
from conftest import REPO_ROOT
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ntrain.v1 import training_pb2 as pb
from ntrain.v1 import training_pb2_grpc
from service_harness import job_spec
from tls_harness import make_pki, self_signed

from ntrain.client import Credentials, open_channel
from service.api.server import ServerConfig, TrainingServer
from service.api.tls import Certificate, TlsFiles
from service.cli import exit_status as cli_errors
from service.cli.app import main as cli_main

pytestmark = pytest.mark.slow

LONG_JOB = job_spec(epochs=100_000)  # occupies the one CPU slot until canceled
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    return make_pki(tmp_path_factory.mktemp("pki") / "secrets")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> SimpleNamespace:
    """A second, unrelated CA with its own certificates and tokens."""
    return make_pki(tmp_path_factory.mktemp("other-pki") / "secrets")


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki):
    """TLS, tokens (plus a second trainer, added with `ntrain token new`), secured metrics."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    shutil.copy(pki.tokens, tokens)
    running = TrainingServer(
        ServerConfig(
            port=0,
            metrics_port=0,
            state_dir=tmp_path_factory.mktemp("state"),
            gpu_inventory=(),
            warm_worker=False,
            tls=pki.server,
            auth_tokens=tokens,
            metrics_tls=pki.server,
            metrics_basic_auth=pki.metrics_users,
        )
    )
    running.start()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli_main(
            ["token", "new", "tina", "--role", "trainer", "--auth-tokens", str(tokens)]
        )
    assert status == 0
    assert running.reload() == []  # tokens are re-read without a restart
    pki.token["tina"] = out.getvalue().strip()
    yield running
    running.stop(grace=1.0)


def stub(server, *, ca=None, token=None, cert=None, key=None, pki=None):
    """A TrainingService stub on a fresh channel; `pki` gives the CA when `ca` is not set."""
    credentials = Credentials(
        tls_ca=ca if ca is not None else pki.ca, tls_cert=cert, tls_key=key, token=token
    )
    channel = open_channel(f"127.0.0.1:{server.port}", credentials)
    return training_pb2_grpc.TrainingServiceStub(channel), channel


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def as_role(server, pki, role):
    return stub(server, pki=pki, token=pki.token[role])[0]


# -- TLS and tokens ------------------------------------------------------------------------


def test_a_real_tls_handshake_with_a_token(server, pki):
    viewer = as_role(server, pki, "viewer")
    info = viewer.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    assert info.version and any(device.kind == "CPU" for device in info.devices)


def test_no_token_wrong_token_or_another_scheme_is_unauthenticated(server, pki, other_pki):
    request = pb.ListJobsRequest()
    anonymous, _ = stub(server, pki=pki)
    error = refused(lambda: anonymous.ListJobs(request, timeout=30))
    assert error.code() == Code.UNAUTHENTICATED and "bearer token" in error.details()
    # A token of another server (same role names, other secrets) is nobody here.
    stranger = stub(server, pki=pki, token=other_pki.token["admin"])[0]
    error = refused(lambda: stranger.ListJobs(request, timeout=30))
    assert error.code() == Code.UNAUTHENTICATED
    assert other_pki.token["admin"] not in error.details()
    basic = [("authorization", "Basic " + base64.b64encode(b"admin:x").decode())]
    error = refused(lambda: anonymous.ListJobs(request, metadata=basic, timeout=30))
    assert error.code() == Code.UNAUTHENTICATED


def test_health_is_open_and_reflection_needs_a_token(server, pki):
    _, channel = stub(server, pki=pki)
    health = health_pb2_grpc.HealthStub(channel)
    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING

    def services(channel) -> list[str]:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = reflection.ServerReflectionInfo(iter([request]), timeout=30)
        return [service.name for service in response.list_services_response.service]

    error = refused(lambda: services(channel))
    assert error.code() == Code.UNAUTHENTICATED
    assert "ntrain.v1.TrainingService" in services(
        stub(server, pki=pki, token=pki.token["viewer"])[1]
    )


def test_a_wrong_ca_fails_the_handshake(server, pki, other_pki):
    viewer = stub(server, ca=other_pki.ca, token=pki.token["viewer"])[0]
    error = refused(lambda: viewer.ListJobs(pb.ListJobsRequest(), timeout=30))
    assert error.code() == Code.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in error.details() or "handshake" in error.details()


def test_a_plaintext_client_gets_nothing_and_will_not_send_its_token_off_host(server, pki):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    plain = training_pb2_grpc.TrainingServiceStub(channel)
    error = refused(lambda: plain.ListJobs(pb.ListJobsRequest(), timeout=30))
    assert error.code() == Code.UNAVAILABLE
    from ntrain.client import CredentialsError

    with pytest.raises(CredentialsError, match="refusing to send a token in plaintext"):
        open_channel("192.0.2.1:50051", Credentials(token="t"))  # never connects


# -- roles and ownership -------------------------------------------------------------------


def test_a_viewer_reads_but_may_not_submit_cancel_or_predict(server, pki):
    viewer = as_role(server, pki, "viewer")
    error = refused(lambda: viewer.SubmitJob(pb.SubmitJobRequest(spec=job_spec()), timeout=30))
    assert error.code() == Code.PERMISSION_DENIED and "viewer 'viewer'" in error.details()
    for call in (
        lambda: viewer.CancelJob(pb.CancelJobRequest(job_id="job-000000000000"), timeout=30),
        lambda: viewer.Evaluate(pb.EvaluateRequest(job_id="job-000000000000"), timeout=30),
        lambda: viewer.Predict(pb.PredictRequest(job_id="job-000000000000"), timeout=30),
    ):
        assert refused(call).code() == Code.PERMISSION_DENIED
    viewer.ListJobs(pb.ListJobsRequest(), timeout=30)


def test_owners_cancel_their_own_jobs_and_admins_any(server, pki):
    trainer, tina, admin, viewer = (
        as_role(server, pki, role) for role in ("trainer", "tina", "admin", "viewer")
    )
    running = trainer.SubmitJob(pb.SubmitJobRequest(spec=LONG_JOB, request_id="long"), timeout=30)
    queued = trainer.SubmitJob(pb.SubmitJobRequest(spec=job_spec()), timeout=30)
    admins = admin.SubmitJob(pb.SubmitJobRequest(spec=job_spec()), timeout=30)
    assert (running.owner, admins.owner) == ("trainer", "admin")

    probe = [pb.Example(values=[0.0] * 784)]
    for job in (running, queued):  # another trainer: not its jobs
        for call in (
            lambda job=job: tina.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=30),
            lambda job=job: tina.Evaluate(pb.EvaluateRequest(job_id=job.job_id), timeout=30),
            lambda job=job: tina.Predict(
                pb.PredictRequest(job_id=job.job_id, inputs=probe), timeout=30
            ),
        ):
            error = refused(call)
            assert error.code() == Code.PERMISSION_DENIED, error
            assert "owned by 'trainer'" in error.details()
    error = refused(
        lambda: trainer.CancelJob(pb.CancelJobRequest(job_id=admins.job_id), timeout=30)
    )
    assert error.code() == Code.PERMISSION_DENIED
    assert (
        viewer.GetJob(pb.GetJobRequest(job_id=running.job_id), timeout=30).state
        != pb.JOB_STATE_CANCELED
    )

    canceled = trainer.CancelJob(pb.CancelJobRequest(job_id=queued.job_id), timeout=30)
    assert canceled.state == pb.JOB_STATE_CANCELED and canceled.request_id  # its own key
    canceled = admin.CancelJob(pb.CancelJobRequest(job_id=running.job_id), timeout=60)
    assert canceled.state == pb.JOB_STATE_CANCELED and canceled.request_id == "long"
    assert admin.CancelJob(pb.CancelJobRequest(job_id=admins.job_id), timeout=30).state == (
        pb.JOB_STATE_CANCELED
    )


def test_request_ids_are_per_owner_and_hidden_from_others(server, pki):
    trainer, tina, admin, viewer = (
        as_role(server, pki, role) for role in ("trainer", "tina", "admin", "viewer")
    )
    spec = job_spec(epochs=2)

    def submit(who, key, job=spec):
        return who.SubmitJob(pb.SubmitJobRequest(spec=job, request_id=key), timeout=30)

    mine = submit(trainer, "client-a-secret-run")
    assert submit(trainer, "client-a-secret-run").job_id == mine.job_id  # idempotent
    theirs = submit(tina, "client-a-secret-run")  # the same text is tina's own key
    assert theirs.job_id != mine.job_id and theirs.request_id == "client-a-secret-run"
    error = refused(lambda: submit(trainer, "client-a-secret-run", job_spec(epochs=3)))
    assert error.code() == Code.ALREADY_EXISTS

    seen = {
        "tina": tina.GetJob(pb.GetJobRequest(job_id=mine.job_id), timeout=30),
        "viewer": viewer.GetJob(pb.GetJobRequest(job_id=mine.job_id), timeout=30),
        "admin": admin.GetJob(pb.GetJobRequest(job_id=mine.job_id), timeout=30),
        "trainer": trainer.GetJob(pb.GetJobRequest(job_id=mine.job_id), timeout=30),
    }
    assert {who: job.request_id for who, job in seen.items()} == {
        "tina": "", "viewer": "", "admin": "client-a-secret-run", "trainer": "client-a-secret-run"
    }  # fmt: skip
    assert all(job.owner == "trainer" for job in seen.values())
    listed = viewer.ListJobs(pb.ListJobsRequest(page_size=1000), timeout=30).jobs
    assert {mine.job_id, theirs.job_id} <= {job.job_id for job in listed}
    assert all(job.request_id == "" for job in listed)  # a viewer owns none of them
    for job in (mine, theirs):
        admin.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=60)


def test_client_certificates_are_required_when_asked(tmp_path, pki, other_pki):
    """Mutual TLS, without tokens (every certified caller is the local admin), no reflection."""
    files = TlsFiles(cert=pki.server.cert, key=pki.server.key, client_ca=pki.dir / "ca.crt")
    config = ServerConfig(
        port=0,
        metrics_port=None,
        state_dir=tmp_path,
        gpu_inventory=(),
        warm_worker=False,
        tls=files,
        reflection=False,
    )
    server = TrainingServer(config)
    server.start()
    try:
        request = pb.GetServerInfoRequest()
        without = stub(server, pki=pki)[0]
        assert (
            refused(lambda: without.GetServerInfo(request, timeout=30)).code() == Code.UNAVAILABLE
        )
        foreign = stub(server, pki=pki, cert=other_pki.client_cert, key=other_pki.client_key)[0]
        assert (
            refused(lambda: foreign.GetServerInfo(request, timeout=30)).code() == Code.UNAVAILABLE
        )
        client, channel = stub(server, pki=pki, cert=pki.client_cert, key=pki.client_key)
        assert client.GetServerInfo(request, timeout=30).version
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        error = refused(lambda: list(reflection.ServerReflectionInfo(iter([listing]), timeout=30)))
        assert error.code() == Code.UNIMPLEMENTED  # --no-reflection
    finally:
        server.stop(grace=0.0)


def test_a_certificate_covers_its_names_and_a_wildcard_one_label():
    certificate = Certificate(
        not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        not_after=datetime.datetime(2099, 1, 1, tzinfo=datetime.UTC),
        names=frozenset({"*.example.com", "trainer", "127.0.0.1"}),
    )
    asked = frozenset({"a.example.com", "trainer", "127.0.0.1"})
    assert certificate.lacks(asked) == []
    deeper = frozenset({"a.b.example.com", "example.com", ".example.com", "::1"})
    assert certificate.lacks(asked | deeper) == [
        ".example.com",
        "::1",
        "a.b.example.com",
        "example.com",
    ]


def test_the_names_of_a_certificate_from_make_certs(pki):
    assert pki.server.names() == {"trainer", "localhost", "127.0.0.1", "::1"}


def test_sighup_keeps_the_certificate_when_the_new_one_is_expired_early_or_not_its_keys(
    tmp_path, pki, other_pki, caplog
):
    live = tmp_path / "live"
    live.mkdir()
    files = TlsFiles(cert=live / "server.crt", key=live / "server.key")
    for name in ("server.crt", "server.key"):
        shutil.copy(pki.dir / name, live / name)
    config = ServerConfig(
        port=0, metrics_port=None, state_dir=tmp_path / "state", gpu_inventory=(),
        warm_worker=False, tls=files, metrics_tls=files,
    )  # fmt: skip
    server = TrainingServer(config)
    server.start()
    expired = self_signed(tmp_path / "expired", start="20200101000000Z", end="20200102000000Z")
    early = self_signed(tmp_path / "early", start="20990101000000Z", end="20990102000000Z")
    # Valid now and its key's, but for localhost alone: not trainer, 127.0.0.1 or ::1.
    renamed = self_signed(tmp_path / "renamed", start="20200101000000Z", end="20990102000000Z")
    try:
        for cert, key, why in [
            (expired.cert, expired.key, "the certificate expired on 2020-01-02 00:00 UTC"),
            (early.cert, early.key, "the certificate is not valid before 2099-01-01 00:00 UTC"),
            (
                pki.dir / "server.crt",
                other_pki.dir / "server.key",
                "the key does not match the certificate",
            ),
            (
                renamed.cert,
                renamed.key,
                "the certificate does not name 127.0.0.1, ::1, trainer, as the one in use "
                "does, so clients that connect by that name would refuse it (restart the "
                "server to change its names)",
            ),
        ]:
            (live / "server.crt").write_bytes(cert.read_bytes())  # in place, as make-certs.sh
            (live / "server.key").write_bytes(key.read_bytes())
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="service.api.server"):
                problems = server.reload()
            assert len(problems) == 2, problems  # the gRPC port's and the metrics endpoint's
            for what, problem in zip(("TLS", "metrics TLS"), problems, strict=True):
                assert problem.startswith(
                    f"kept the old {what} certificate: cannot use the TLS "
                    f"files {live / 'server.crt'}, {live / 'server.key'}: "
                )
                assert problem.endswith(why) and "\n" not in problem
            assert [r.getMessage() for r in caplog.records] == problems  # and says so
            # New handshakes still get the old certificate, which clients trust.
            client, channel = stub(server, pki=pki)
            assert client.GetServerInfo(pb.GetServerInfoRequest(), timeout=30).version
            channel.close()
        for name in ("server.crt", "server.key"):
            shutil.copy(pki.dir / name, live / name)
        with caplog.at_level(logging.INFO, logger="service.api.server"):
            assert server.reload() == []
        assert "reloaded the TLS certificate (valid until 20" in caplog.text
    finally:
        server.stop(grace=0.0)


# -- the metrics endpoint -------------------------------------------------------------------


def fetch(url: str, *, context: ssl.SSLContext | None, auth: tuple[str, str] | None = None):
    """(status, body) of a GET."""
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        )
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_only_at_metrics_over_tls_with_basic_auth_and_no_token_in_them(server, pki):
    context = ssl.create_default_context(cadata=pki.ca.decode())
    base = f"https://127.0.0.1:{server.metrics_port}"
    right = ("prometheus", pki.metrics_password)
    assert fetch(f"{base}/metrics", context=context)[0] == 401
    assert fetch(f"{base}/metrics", context=context, auth=("prometheus", "wrong"))[0] == 401
    assert fetch(f"{base}/metrics", context=context, auth=("nobody", right[1]))[0] == 401
    for path in ("/", "/any/other/path", "/metrics/", "/favicon.ico"):
        assert fetch(f"{base}{path}", context=context, auth=right)[0] == 404, path
    status, body = fetch(f"{base}/metrics", context=context, auth=right)
    assert status == 200 and "grpc_server_handled_total" in body
    assert 'grpc_code="UNAUTHENTICATED"' in body and 'grpc_code="PERMISSION_DENIED"' in body
    for secret in (*pki.token.values(), pki.metrics_password):
        assert secret not in body
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP, TLS port
        fetch(f"http://127.0.0.1:{server.metrics_port}/metrics", context=None, auth=right)


# -- ntrain serve: SIGHUP, logs, files ------------------------------------------------------


def run_cli(*argv: str, env: dict[str, str] | None = None) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli_main(list(argv))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return SimpleNamespace(status=status, out=out.getvalue(), err=err.getvalue())


def test_serve_reloads_certificates_on_sighup_under_a_running_job_and_logs_no_token(
    tmp_path, pki, other_pki
):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(pki.dir / name, live / name)
    state, log_path, port_file = tmp_path / "state", tmp_path / "serve.log", tmp_path / "port"
    command = [
        sys.executable, "-m", "service.cli", "serve", "--port", "0", "--metrics-port", "0",
        "--state-dir", str(state), "--port-file", str(port_file), "--no-warm-worker",
        "--tls-cert", str(live / "server.crt"), "--tls-key", str(live / "server.key"),
        "--auth-tokens", str(pki.tokens),
        "--metrics-tls-cert", str(live / "server.crt"),
        "--metrics-tls-key", str(live / "server.key"),
        "--metrics-basic-auth", str(pki.metrics_users),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    wrong_token = "wrong-" + pki.token["admin"][::-1]
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "ntrain serve did not start in 120 s"
            time.sleep(0.05)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        client = ["--address", address, "--tls-ca", str(pki.dir / "ca.crt")]

        # Wrong and missing tokens: one line, exit 1; a viewer may not train.
        for env, words in (
            ({"NTRAIN_TOKEN": wrong_token}, "not authenticated: the bearer token is not valid"),
            ({}, "not authenticated: this server requires a bearer token"),
            ({"NTRAIN_TOKEN": pki.token["viewer"]}, "permission denied: viewer 'viewer'"),
        ):
            result = run_cli("train", "--detach", "--dataset", "synthetic", *client, env=env)
            assert result.status == cli_errors.EXIT_ERROR, result
            assert result.err.count("\n") == 1 and words in result.err, result.err
        trainer_file = str(pki.dir / "trainer.token")
        submitted = run_cli(
            "train", "--detach", "--dataset", "synthetic", "--layers", "64:relu,10:softmax",
            "--strategy", "cpu", "--epochs", "100000", "--token-file", trainer_file, *client,
        )  # fmt: skip
        assert submitted.status == 0, submitted.err
        job_id = submitted.out.strip()

        # An open connection from before the reload, following the job.
        trainer, old_channel = stub(SimpleNamespace(port=address.rsplit(":")[1]), pki=pki,
                                    token=pki.token["trainer"])  # fmt: skip
        events = trainer.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=300)
        assert next(e for e in events if e.HasField("progress")).progress.step > 0

        for name in ("server.crt", "server.key"):  # in place, as make-certs.sh renews
            (live / name).write_bytes((other_pki.dir / name).read_bytes())
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reloaded the metrics TLS certificate" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)

        # New handshakes need the new CA; the open stream goes on; the job runs on.
        result = run_cli("jobs", *client, "--token-file", trainer_file)
        assert result.status == 1 and "TLS handshake" in result.err, result
        renewed = ["--address", address, "--tls-ca", str(other_pki.dir / "ca.crt")]
        listed = run_cli("jobs", *renewed, "--token-file", trainer_file)
        assert listed.status == 0 and job_id in listed.out and "trainer" in listed.out
        assert next(e for e in events if e.HasField("progress")).progress.step > 0
        job = trainer.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30)
        assert job.state == pb.JOB_STATE_RUNNING and job.owner == "trainer"
        context = ssl.create_default_context(cadata=other_pki.ca.decode())
        metrics_port = int(
            log_path.read_text().split("metrics on https://127.0.0.1:")[1].split("/")[0]
        )
        status, metrics = fetch(
            f"https://127.0.0.1:{metrics_port}/metrics",
            context=context,
            auth=("prometheus", pki.metrics_password),
        )
        assert status == 200
        canceled = run_cli("cancel", job_id, *renewed, "--token-file", trainer_file)
        assert canceled.status == 0 and "CANCELED" in canceled.out, canceled
        events.cancel()
        old_channel.close()

        # Files: the state directory and everything in it are this user's alone.
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for path in [state / "ntrain.db", *state.rglob("*")]:
            if path.is_file():
                assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    log = log_path.read_text()
    # The first refusal of the peer, with the method and the reason (not the token).
    assert (
        "refused a call from 127.0.0.1: /ntrain.v1.TrainingService/SubmitJob: "
        "the bearer token is not valid on this server" in log
    )
    for secret in (*pki.token.values(), wrong_token, pki.metrics_password):
        assert secret not in log and secret not in metrics
    worker_logs = "".join(p.read_text(errors="replace") for p in state.rglob("*.log"))
    assert not any(secret in worker_logs for secret in pki.token.values())
