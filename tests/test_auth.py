"""Token and password files, hashes, bearer metadata, and the refusal to serve openly.

No server here: the interceptor, TLS and roles over real connections are in
test_security.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat

import pytest
from ntrain.v1 import training_pb2

from service.api.auth import (
    METHOD_ACTIONS,
    SERVICE,
    PasswordTable,
    TokenTable,
    bearer_token,
    hash_secret,
    new_token,
)
from service.api.server import ServerConfig, exposure_problem, is_loopback
from service.api.tls import TlsFiles
from service.cli import exit_status as cli_errors
from service.cli.app import main as cli_main
from service.jobs.access import Principal
from service.jobs.errors import Unauthenticated


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
    assert len(token) >= 40 and token != new_token()
    hashed = hash_secret(token)
    assert token not in hashed and hashed.startswith("scrypt$16384$8$1$")
    assert hash_secret(token) != hashed  # a fresh salt each time
    table = TokenTable([(Principal(name="alice", role="trainer"), hashed)])
    assert table.authenticate(token) == Principal(name="alice", role="trainer")
    assert table.authenticate(token) == Principal(name="alice", role="trainer")  # remembered
    assert table.authenticate(token + "x") is None
    assert table.authenticate("") is None


def test_the_token_file_is_read_and_its_errors_name_the_line_not_the_text(tmp_path):
    alice, bob = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(
        f"# principals\n\nalice trainer {hash_secret(alice)}\n  bob   viewer {hash_secret(bob)}  \n"
    )
    table = TokenTable.load(path)
    assert len(table) == 2 and table.names == {"alice", "bob"}
    assert table.authenticate(bob) == Principal(name="bob", role="viewer")

    secret = new_token()
    for line, message in [
        (f"carol trainer {secret}", "the hash is not scrypt"),  # a token pasted by mistake
        (f"carol root {hash_secret('x')}", "the role must be one of viewer, trainer, admin"),
        (f"carol trainer {hash_secret('x')} {secret}", "expected NAME ROLE HASH"),
        (f"car/ol trainer {hash_secret('x')}", "a name is letters, digits"),
        (f"alice admin {hash_secret('x')}", "alice is listed twice"),
    ]:
        path.write_text(f"alice trainer {hash_secret(alice)}\n{line}\n")
        with pytest.raises(ValueError, match=message) as raised:
            TokenTable.load(path)
        assert str(raised.value).startswith(f"{path}:2: ")
        assert secret not in str(raised.value)
    with pytest.raises(ValueError, match="cannot read"):
        TokenTable.load(tmp_path / "missing")


def test_metrics_users_are_name_and_hash():
    table = PasswordTable({"prometheus": hash_secret("s3cret")})
    assert table.check("prometheus", "s3cret") and table.check("prometheus", "s3cret")
    assert not table.check("prometheus", "s3cret ") and not table.check("grafana", "s3cret")


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


def test_token_hash_reads_standard_input():
    status, out, _ = run_cli("token", "hash", stdin="pass word\n")
    assert status == 0
    assert PasswordTable({"p": out.strip()}).check("p", "pass word")
    assert run_cli("token", "hash", stdin="\n")[0] == 2
