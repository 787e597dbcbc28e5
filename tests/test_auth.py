"""Token and password files, hashes, bearer metadata, and the refusal to serve openly.

No server here: the interceptor, TLS and roles over real connections are in
test_security.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import threading
import time

import pytest
from ntrain.v1 import training_pb2

from service.api import auth
from service.api.auth import (
    METHOD_ACTIONS,
    SERVICE,
    PasswordTable,
    PeerFailures,
    TokenTable,
    bearer_token,
    hash_secret,
    new_token,
    peer_host,
    token_hash,
)
from service.api.server import ServerConfig, exposure_problem, is_loopback
from service.api.tls import TlsFiles
from service.cli import exit_status as cli_errors
from service.cli.app import main as cli_main
from service.jobs.access import Principal, authorize_priority
from service.jobs.errors import PermissionDenied, Unauthenticated


def run_cli(*argv: str, stdin: str = ""):
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        _stdin(stdin),
    ):
        status = cli_main(list(argv))
    return status, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _stdin(text: str):
    import sys

    saved, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


def test_a_token_matches_its_hash_only():
    token = new_token()
    assert token.startswith("ntr_") and len(token) == 4 + 12 + 1 + 43 and token != new_token()
    hashed = token_hash(token)
    token_id = token.split("_")[1]
    assert hashed.startswith(f"sha256${token_id}$") and token.split("_", 2)[2] not in hashed
    assert token_hash(token) == hashed  # the secret is 256 random bits: no salt needed
    table = TokenTable([(Principal(name="alice", role="trainer"), hashed)])
    assert table.authenticate(token) == Principal(name="alice", role="trainer")
    assert table.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert table.authenticate(f"ntr_{'0' * 12}_{token[-43:]}") is None  # an unknown id
    for wrong in ("", token + "x", token.replace("ntr_", "ntx_"), "a" * 8000):
        assert table.authenticate(wrong) is None
    with pytest.raises(ValueError, match="ntr_<id>_<secret>"):
        token_hash("a token chosen by hand")


def test_the_token_file_is_read_and_its_errors_name_the_line_not_the_text(tmp_path):
    alice, bob = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(
        f"# principals\n\nalice trainer {token_hash(alice)}\n  bob   viewer {token_hash(bob)}  \n"
    )
    table = TokenTable.load(path)
    assert len(table) == 2 and table.names == {"alice", "bob"}
    assert table.authenticate(bob) == Principal(name="bob", role="viewer")

    secret = new_token()
    for line, message in [
        (f"carol trainer {secret}", "the hash is not sha256"),  # a token pasted by mistake
        (f"carol root {token_hash(secret)}", "the role must be one of viewer, trainer, admin"),
        (f"carol trainer {token_hash(secret)} {secret}", "after the hash only max-priority=N"),
        (f"carol trainer {token_hash(secret)} max-priority=1 {secret}", "expected NAME ROLE HASH"),
        (f"car/ol trainer {token_hash(secret)}", "a name is letters, digits"),
        (f"alice admin {token_hash(secret)}", "alice is listed twice"),
        (f"carol admin {token_hash(alice)}", "carol's token id is another principal's too"),
    ]:
        path.write_text(f"alice trainer {token_hash(alice)}\n{line}\n")
        with pytest.raises(ValueError, match=message) as raised:
            TokenTable.load(path)
        assert str(raised.value).startswith(f"{path}")
        assert secret not in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="cannot read"):
        TokenTable.load(tmp_path / "missing")


def test_a_token_file_of_scrypt_hashes_is_refused_with_how_to_reissue_each(tmp_path):
    path = tmp_path / "tokens"
    old = hash_secret(new_token().split("_", 2)[2])  # what the scrypt era wrote
    path.write_text(f"alice trainer {token_hash(new_token())}\nbob viewer {old}\n")
    with pytest.raises(ValueError) as raised:
        TokenTable.load(path)
    assert str(raised.value) == (
        f"{path}:2: bob's token is of the old kind (a scrypt hash), which this server no "
        f"longer accepts; reissue it: delete the line, then run ntrain token new bob --role "
        f"viewer --auth-tokens {path}"
    )
    status, _, err = run_cli(
        "token", "new", "carol", "--role", "viewer", "--auth-tokens", str(path)
    )
    assert status == 1 and "reissue it" in err and err.count("\n") == 1


def test_metrics_users_are_name_and_hash_and_an_unknown_user_costs_one_scrypt(monkeypatch):
    table = PasswordTable({"prometheus": hash_secret("s3cret")})
    assert table.check("prometheus", "s3cret") and table.check("prometheus", "s3cret")
    assert "prometheus" in table and "grafana" not in table
    checked: list[tuple[int, int, int]] = []
    matches = auth._Hash.matches

    def counted(self, secret):
        checked.append((self.n, self.r, self.p))
        return matches(self, secret)

    monkeypatch.setattr(auth._Hash, "matches", counted)
    assert not table.check("prometheus", "s3cret ") and not table.check("grafana", "s3cret")
    assert not table.check("grafana", "")
    # The same scrypt, as costly, for the existing user and for unknown ones.
    assert checked == [(auth.SCRYPT_N, auth.SCRYPT_R, auth.SCRYPT_P)] * 3


def test_peer_failures_are_logged_per_address_and_repeated_ones_delayed(caplog):
    now, slept = [0.0], []
    failures = PeerFailures("call", clock=lambda: now[0], sleep=slept.append)
    assert peer_host("ipv4:127.0.0.1:5555") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5555") == "::1" and peer_host("unix:/tmp/s") == "unix:/tmp/s"
    with caplog.at_level("WARNING", logger="service.api.auth"):
        for port in range(auth.FREE_FAILURES + 3):  # a new connection each time
            failures.failed(f"ipv4:10.0.0.1:{4000 + port}", "the bearer token is not valid")
        failures.failed("ipv4:10.0.0.2:4000", "the bearer token is not valid")
    assert failures.count("ipv4:10.0.0.1:1") == auth.FREE_FAILURES + 3
    assert slept == [auth.FAILURE_DELAY_SECONDS] * 3  # only past the free ones, only 10.0.0.1
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "refused a call from 10.0.0.1: the bearer token is not valid",
        "refused 6 calls from 10.0.0.1 within 60 s: its refusals are now answered 1 s late",
        "refused a call from 10.0.0.2: the bearer token is not valid",
    ]
    now[0] += auth.FAILURE_WINDOW_SECONDS  # a new window: free again, and the count is told
    caplog.clear()
    with caplog.at_level("WARNING", logger="service.api.auth"):
        failures.failed("ipv4:10.0.0.1:4000", "the bearer token is not valid")
    assert [record.getMessage() for record in caplog.records][0] == (
        "refused 8 calls from 10.0.0.1 in the minute before"
    )
    assert len(slept) == 3 and failures.count("ipv4:10.0.0.1:1") == 1


def test_at_most_max_delayed_refusals_wait_at_once():
    release, waiting = threading.Event(), []
    failures = PeerFailures("call", sleep=lambda seconds: (waiting.append(1), release.wait()))
    for _ in range(auth.FREE_FAILURES):
        failures.failed("ipv4:10.0.0.1:1", "wrong")
    threads = [
        threading.Thread(target=failures.failed, args=("ipv4:10.0.0.1:1", "wrong"))
        for _ in range(auth.MAX_DELAYED + 10)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while sum(thread.is_alive() for thread in threads) > auth.MAX_DELAYED:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(waiting) == auth.MAX_DELAYED  # the other 10 were answered at once
    release.set()
    for thread in threads:
        thread.join()


def test_bearer_metadata():
    assert bearer_token([("authorization", "Bearer abc"), ("x-other", "1")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    for metadata in (
        None,
        [],
        [("authorization", "Basic abc")],
        [("authorization", "Bearer ")],
        [("authorization", "Bearer a"), ("authorization", "Bearer b")],
    ):
        with pytest.raises(Unauthenticated):
            bearer_token(metadata)


def test_every_method_of_the_service_has_a_role():
    methods = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].methods
    assert {f"/{SERVICE}/{m.name}" for m in methods} <= set(METHOD_ACTIONS)


def test_only_loopback_may_be_open():
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1")
    assert is_loopback("[::1]") and is_loopback("localhost")
    for address in ("0.0.0.0", "::", "10.0.0.1", "example.org", ""):
        assert not is_loopback(address), address
    files = TlsFiles(cert=__file__, key=__file__)  # never read here
    open_config = ServerConfig(bind_address="0.0.0.0")
    problem = exposure_problem(open_config)
    assert problem is not None and "--insecure" in problem and "\n" not in problem
    for needed in ("--tls-cert", "--auth-tokens", "--metrics-tls-cert", "--metrics-basic-auth"):
        assert needed in problem
    secured = ServerConfig(
        bind_address="0.0.0.0",
        tls=files,
        auth_tokens=__file__,
        metrics_tls=files,
        metrics_basic_auth=__file__,
    )
    assert exposure_problem(secured) is None
    assert exposure_problem(ServerConfig(bind_address="0.0.0.0", insecure=True)) is None
    no_metrics = ServerConfig(bind_address="::", metrics_port=None, tls=files, auth_tokens=__file__)
    assert exposure_problem(no_metrics) is None
    assert exposure_problem(ServerConfig(bind_address="127.0.0.1")) is None


@pytest.mark.parametrize(
    "extra",
    [[], ["--tls-cert", "c", "--tls-key", "k", "--auth-tokens", "t"]],
)
def test_serve_refuses_an_open_address_in_one_line_with_exit_2(tmp_path, extra):
    status, out, err = run_cli(
        "serve", "--bind", "0.0.0.0", "--port", "0", "--state-dir", str(tmp_path), *extra
    )
    assert status == cli_errors.EXIT_USAGE == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("ntrain: refusing to serve on 0.0.0.0") and "--insecure" in err
    assert ("--metrics-basic-auth" in err) and (("--auth-tokens" in err) == (not extra))
    assert not os.listdir(tmp_path)  # refused before anything was made


def test_token_new_appends_a_principal_and_prints_its_token_once(tmp_path):
    path = tmp_path / "tokens"
    status, out, err = run_cli(
        "token", "new", "alice", "--role", "trainer", "--auth-tokens", str(path)
    )
    assert (status, err) == (0, "")
    token = out.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and token not in path.read_text()
    status, out, _ = run_cli("token", "new", "bob", "--role", "viewer", "--auth-tokens", str(path))
    table = TokenTable.load(path)
    assert table.authenticate(token) == Principal(name="alice", role="trainer")
    assert table.authenticate(out.strip()) == Principal(name="bob", role="viewer")
    status, _, err = run_cli("token", "new", "alice", "--role", "admin", "--auth-tokens", str(path))
    assert status == 1 and "alice is already in" in err
    status, _, err = run_cli("token", "new", "a b", "--role", "admin", "--auth-tokens", str(path))
    assert status == 2


def test_a_token_may_carry_the_highest_priority_its_jobs_may_have(tmp_path):
    path = tmp_path / "tokens"
    _, urgent, _ = run_cli(
        "token", "new", "ops", "--role", "trainer", "--max-priority", "500",
        "--auth-tokens", str(path),
    )  # fmt: skip
    _, modest, _ = run_cli(
        "token", "new", "intern", "--role", "trainer", "--max-priority", "low",
        "--auth-tokens", str(path),
    )  # fmt: skip
    _, plain, _ = run_cli("token", "new", "dev", "--role", "trainer", "--auth-tokens", str(path))
    table = TokenTable.load(path)
    ops, intern, dev = (table.authenticate(t.strip()) for t in (urgent, modest, plain))
    assert (ops.max_priority, intern.max_priority, dev.max_priority) == (500, -100, None)
    authorize_priority(ops, 500)
    authorize_priority(dev, 100)  # high, the default maximum
    with pytest.raises(PermissionDenied, match="priority up to -100, got 0"):
        authorize_priority(intern, 0)
    with pytest.raises(PermissionDenied, match="priority up to 100, got 101"):
        authorize_priority(dev, 101)
    authorize_priority(Principal(name="root", role="admin"), 1000)
    name, role, digest = path.read_text().splitlines()[2].split()
    path.write_text(f"{name} {role} {digest} colour=blue\n")
    with pytest.raises(ValueError, match=r"tokens:1: after the hash only max-priority=N"):
        TokenTable.load(path)


def test_token_hash_reads_standard_input():
    status, out, _ = run_cli("token", "hash", stdin="pass word\n")
    assert status == 0
    assert PasswordTable({"p": out.strip()}).check("p", "pass word")
    assert run_cli("token", "hash", stdin="\n")[0] == 2
