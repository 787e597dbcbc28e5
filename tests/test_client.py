"""ntrain.client: addresses, specs, typed errors, no TensorFlow, and the README's example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import grpc
import numpy as np
import pytest
from conftest import REPO_ROOT
from ntrain.v1 import training_pb2 as pb

import ntrain.client as client
from ntrain.client import Client
from ntrain.client.channel import channel_options, open_channel


@pytest.mark.parametrize(
    "given, expected",
    [
        ("localhost", "localhost:50051"),
        ("127.0.0.1", "127.0.0.1:50051"),
        ("example.org:7", "example.org:7"),
        ("::1", "[::1]:50051"),
        ("[::1]", "[::1]:50051"),
        ("[::1]:9", "[::1]:9"),
    ],
)
def test_an_address_without_a_port_gets_the_default_one(given, expected):
    assert client.normalize_address(given) == expected


@pytest.mark.parametrize("given", ["http://127.0.0.1:50051", "grpc://h:1", ":50051", "h:port"])
def test_an_address_with_a_scheme_or_without_a_host_is_refused_in_one_line(given):
    with pytest.raises(client.AddressError) as raised:
        client.normalize_address(given)
    assert "\n" not in str(raised.value) and given in str(raised.value)


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:9", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("localhost:50051", True),
        ("LOCALHOST", True),
        ("127.attacker.example:50051", False),  # names that only look like loopback
        ("127.0.0.1.nip.io:50051", False),
        ("127.0.0.1.nip.io", False),
        ("localhost.attacker.example:1", False),
        ("[::ffff:127.0.0.1]:1", False),
        ("10.0.0.1:50051", False),
        ("example.org:7", False),
    ],
)
def test_only_loopback_literals_and_localhost_skip_tls_and_the_proxy(address, loopback):
    assert client.is_loopback_address(address) is loopback
    proxy_off = ("grpc.enable_http_proxy", 0) in channel_options(address)
    assert proxy_off is loopback
    with_token = client.Credentials(token="ntr_000000000000_" + "a" * 43)
    if loopback:
        open_channel(address, with_token).close()
    else:
        with pytest.raises(client.CredentialsError, match="refusing to send a token in plaintext"):
            open_channel(address, with_token)


def test_a_job_spec_comes_from_a_message_a_dict_or_a_json_file(tmp_path):
    fields = {"dataset": "synthetic", "epochs": 3, "optimizer": {"learningRate": 0.01}}
    expected = pb.JobSpec(
        dataset="synthetic", epochs=3, optimizer=pb.OptimizerSpec(learning_rate=0.01)
    )
    path = tmp_path / "job.json"
    path.write_text(json.dumps(fields))
    assert client.job_spec(fields) == expected
    assert client.job_spec(path) == expected
    assert client.job_spec(str(path)) == expected
    assert client.job_spec(expected) is expected
    with pytest.raises(client.InvalidArgument, match="not a job spec: .*epoch"):
        client.job_spec({"epoch": 3})
    with pytest.raises(client.InvalidArgument, match="cannot read a job spec"):
        client.job_spec(tmp_path / "missing.json")


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_each_status_code_becomes_its_own_exception_with_a_one_line_message():
    cases = {
        grpc.StatusCode.NOT_FOUND: client.NotFound,
        grpc.StatusCode.INVALID_ARGUMENT: client.InvalidArgument,
        grpc.StatusCode.FAILED_PRECONDITION: client.FailedPrecondition,
        grpc.StatusCode.PERMISSION_DENIED: client.PermissionDenied,
        grpc.StatusCode.UNAUTHENTICATED: client.Unauthenticated,
        grpc.StatusCode.UNAVAILABLE: client.Unavailable,
        grpc.StatusCode.ALREADY_EXISTS: client.AlreadyExists,
        grpc.StatusCode.RESOURCE_EXHAUSTED: client.ResourceExhausted,
    }
    for code, cls in cases.items():
        error = client.exceptions.from_rpc_error(FakeRpcError(code, "it\nbroke"), "h:1")
        assert type(error) is cls and error.code == code and error.details == "it\nbroke"
        assert isinstance(error, client.NtrainError) and "\n" not in str(error)
    other = client.exceptions.from_rpc_error(FakeRpcError(grpc.StatusCode.DATA_LOSS, "x"), "h:1")
    assert type(other) is client.RpcFailed and other.code == grpc.StatusCode.DATA_LOSS


def test_the_client_and_the_command_line_import_no_tensorflow():
    code = (
        "import sys, ntrain.client, service.cli.app, service.cli.parser\n"
        "service.cli.parser.build_parser()\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'prometheus_client'))))\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('naive_model'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    heavy, library = done.stdout.split("\n")[:2]
    assert heavy == ""
    # The command line's defaults, input scaling and strategy names come from these
    # numpy-only modules (naive_model.results through service.protocol; naive_model.npz,
    # the .npz header checks, and naive_model.canonical, the converted layout, through
    # naive_model.data).
    allowed = {
        "naive_model",
        "naive_model.canonical",
        "naive_model.config",
        "naive_model.data",
        "naive_model.npz",
        "naive_model.results",
    }
    assert set(library.split()) <= allowed
    done = subprocess.run(
        [sys.executable, "-c", "import sys, ntrain.client; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    )
    assert "naive_model" not in done.stdout and "'service" not in done.stdout


# -- against a real server ---------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    from service_harness import RunningServer

    running = RunningServer(tmp_path / "state", warm_worker=False)
    yield running
    running.stop()


def _readme_client_example() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## The Python client") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_client_example_runs_against_a_real_server(server, tmp_path):
    env = dict(os.environ, NTRAIN_ADDRESS=f"127.0.0.1:{server.server.port}")
    done = subprocess.run(
        [sys.executable, "-c", _readme_client_example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.count("test accuracy") == 2, out
    assert re.search(r"predicted classes \[\d \d \d\] of \(3, 10\)", out), out
    assert "not found: job 'job-nope'" in out, out


@pytest.mark.slow
def test_the_client_follows_a_job_and_raises_typed_errors(server):
    from service_harness import job_spec

    with Client(f"127.0.0.1:{server.server.port}") as api:
        job = api.submit(job_spec(epochs=1), request_id="r1")
        assert api.submit(job_spec(epochs=1), request_id="r1").job_id == job.job_id
        with pytest.raises(client.AlreadyExists):
            api.submit(job_spec(epochs=2), request_id="r1")
        seen = []
        ended = api.wait(job.job_id, on_event=seen.append)
        assert ended.state == pb.JOB_STATE_SUCCEEDED
        sequences = [event.sequence for event in seen]
        assert sequences == list(range(1, len(seen) + 1))
        assert isinstance(seen[-1].payload, pb.StateTransition)
        assert any(isinstance(event.payload, pb.JobResult) for event in seen)
        later = list(api.watch(job.job_id, after=sequences[-2]))
        assert [event.sequence for event in later] == [sequences[-1]]
        assert [j.job_id for j in api.list(states=["SUCCEEDED"])] == [job.job_id]
        assert api.list(states=["RUNNING"]) == []
        images = np.zeros((2, 28, 28), dtype=np.uint8)
        probabilities = api.predict(job.job_id, images)
        assert probabilities.shape == (2, 10) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
        with pytest.raises(client.NotFound):
            api.get("job-nope")
        with pytest.raises(client.InvalidArgument, match="learning_rate"):
            api.submit(job_spec(optimizer=pb.OptimizerSpec(name="sgd", learning_rate=-1)))
        with pytest.raises(client.InvalidArgument):
            api.predict(job.job_id, np.zeros((1, 5), dtype=np.float32))
        assert api.health() == "SERVING" and api.info().version
