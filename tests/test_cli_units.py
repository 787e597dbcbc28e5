"""The ntrain command line's parts that need no training server.

Argument parsing and spec building, the progress bar, output formatting, error
messages, and WatchJob reconnection against a small fake TrainingService served
by a real gRPC server on port 0.
"""

from __future__ import annotations

import hashlib
import io
import signal
import subprocess
import sys
import threading
from concurrent import futures
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from conftest import REPO_ROOT
from ntrain.v1 import training_pb2, training_pb2_grpc

from ntrain import client
from service.cli import commands, parser
from service.cli import exit_status as cli_errors
from service.cli import inputs as cli_inputs
from service.cli import output as cli_output
from service.cli.app import main as cli_main
from service.cli.progress import ProgressRenderer, bar, format_progress_line

# --- parsing and spec building -------------------------------------------------------------


def test_parse_layers_reads_units_and_activations():
    layers = cli_inputs.parse_layers("512:relu, 10:softmax")
    assert [(layer.units, layer.activation) for layer in layers] == [(512, "relu"), (10, "softmax")]
    assert cli_inputs.parse_layers("64")[0].activation == "relu"


@pytest.mark.parametrize("text", ["relu:512", "512:relu:x", "", "512:"])
def test_parse_layers_refuses_malformed_text(text):
    with pytest.raises(Exception, match="UNITS:ACTIVATION"):
        cli_inputs.parse_layers(text)


def test_train_flags_build_the_job_spec():
    args = parser.build_parser().parse_args(
        "train --layers 256:tanh,10:softmax --init seed --optimizer momentum --lr 0.05 "
        "--momentum 0.8 --batch-size 64 --epochs 3 --dataset synthetic --strategy mirrored "
        "--devices 2 --steps-per-execution 10 --jit --seed 7 --checkpoint-every 1 "
        "--max-runtime 60 --precision bfloat16".split()
    )
    spec = commands.build_job_spec(args)
    assert [(layer.units, layer.activation) for layer in spec.layers] == [
        (256, "tanh"),
        (10, "softmax"),
    ]
    assert spec.initializer == "seed"
    assert (spec.optimizer.name, spec.optimizer.learning_rate, spec.optimizer.momentum) == (
        "momentum",
        0.05,
        0.8,
    )
    assert (spec.batch_size, spec.epochs, spec.dataset) == (64, 3, "synthetic")
    assert (spec.strategy.name, spec.strategy.device_count) == ("mirrored", 2)
    assert (spec.steps_per_execution, spec.jit_compile, spec.seed) == (10, True, 7)
    assert (spec.checkpoint_every_epochs, spec.max_runtime_seconds) == (1, 60.0)
    assert spec.precision == "bfloat16"


def test_address_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("NTRAIN_ADDRESS", "example:1234")
    assert parser.build_parser().parse_args(["jobs"]).address == "example:1234"
    monkeypatch.delenv("NTRAIN_ADDRESS")
    assert parser.build_parser().parse_args(["jobs"]).address == client.DEFAULT_ADDRESS


def test_usage_errors_are_one_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--optimizer", "adamw"])
    assert exit_info.value.code == cli_errors.EXIT_USAGE
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "invalid choice: 'adamw'" in error


# --- error messages -----------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: ... Connection refused",
            "the server is not reachable at h:1 (connection refused)",
        ),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", "within 5 s"),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "learning_rate must be a positive finite number, got -1.0",
            "invalid request: learning_rate must be a positive finite number, got -1.0",
        ),
        (grpc.StatusCode.NOT_FOUND, "job x not found", "not found: job x not found"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", "the server is busy: queue full"),
        (grpc.StatusCode.UNIMPLEMENTED, "", "does not offer this request"),
        (grpc.StatusCode.INTERNAL, "boom\nline two", "server error (INTERNAL): boom line two"),
    ],
)
def test_rpc_errors_become_one_friendly_line(code, details, expected):
    message = client.describe_rpc_error(FakeRpcError(code, details), "h:1", timeout=5)
    assert expected in message
    assert "\n" not in message


# --- progress and output ------------------------------------------------------------------


def progress(step_in_epoch, *, epoch=1, steps=10):
    return SimpleNamespace(
        epoch=epoch,
        epochs=2,
        step=step_in_epoch,
        steps_per_epoch=steps,
        step_in_epoch=step_in_epoch,
        loss=0.25,
        accuracy=0.9312,
        examples_per_second=41234.0,
    )


def summary(epoch):
    return SimpleNamespace(
        epoch=epoch,
        train_loss=0.2,
        train_accuracy=0.94,
        eval_loss=0.1,
        eval_accuracy=0.97,
        seconds=5.25,
    )


def test_bar_fills_with_the_fraction():
    assert bar(0.0, 10) == "[" + " " * 10 + "]"
    assert bar(0.5, 10) == "[====>     ]"
    assert bar(1.0, 10) == "[==========]"


def test_progress_line_shows_epoch_step_loss_accuracy_and_rate_within_the_width():
    line = format_progress_line(progress(5), elapsed=7, width=100)
    for part in ("epoch 1/2", " 5/10", "loss 0.2500", "acc  93.12%", "41.2k ex/s", "0:07"):
        assert part in line
    assert len(format_progress_line(progress(5), elapsed=7, width=40)) < 40


def test_plain_output_is_throttled_lines_and_every_epoch_summary():
    now = [0.0]
    out = io.StringIO()
    renderer = ProgressRenderer(out, tty=False, plain_interval=5.0, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] += 1.0
        renderer.progress(progress(step))
    renderer.epoch_end(summary(1), 2)
    renderer.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    # The first event, one after 5 s, the end of the epoch, then the summary.
    assert [line.split()[3] for line in lines[:-1]] == ["1/10", "6/10", "10/10"]
    assert lines[-1].startswith("epoch 1/2 done in 5.2 s: loss 0.2000, accuracy 94.00%")
    assert "test loss 0.1000, accuracy 97.00%" in lines[-1]


def test_tty_output_redraws_one_line_and_keeps_messages_above_it():
    out = io.StringIO()
    renderer = ProgressRenderer(out, tty=True, width=100, redraw_interval=0.0)
    renderer.progress(progress(3))
    renderer.line("a message")
    renderer.progress(progress(10))
    renderer.epoch_end(summary(1), 2)
    renderer.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") >= 3
    assert "a message\n" in text
    assert text.endswith("accuracy 97.00%\n")


def test_ascii_image_draws_a_square_image_at_half_height():
    pixels = np.zeros((28, 28), dtype=np.float32)
    pixels[4:24, 13:15] = 1.0  # a vertical stroke, like a "1"
    art = cli_output.ascii_image(pixels.ravel().tolist())
    assert len(art) == 14 and all(len(row) == 28 for row in art)
    assert art[5][13:15] == "@@" and art[5][0] == " "
    assert cli_output.ascii_image([0.0] * 10) is None


def test_image_beside_caption_centres_the_caption():
    text = cli_output.image_beside_caption(["  ", "##", "  "], ["predicted 1"])
    assert text.splitlines()[1] == "|##|   predicted 1"


def test_jobs_table_lists_each_job():
    job = training_pb2.Job(
        job_id="abc123",
        state=training_pb2.JOB_STATE_SUCCEEDED,
        spec=training_pb2.JobSpec(
            layers=[training_pb2.LayerSpec(units=512), training_pb2.LayerSpec(units=10)],
            epochs=2,
            dataset="mnist",
        ),
        result=training_pb2.JobResult(test_accuracy=0.975, test_loss=0.08),
        progress=training_pb2.Progress(epoch=2, step=938),
        strategy="cpu",
        owner="alice",
    )
    header, row, anonymous = cli_output.jobs_table([job, training_pb2.Job(job_id="x")]).splitlines()
    assert header.split() == [
        "JOB", "STATE", "CREATED", "DATASET", "LAYERS", "EPOCH", "ACCURACY", "STRATEGY", "OWNER"
    ]  # fmt: skip
    assert row.split() == [
        "abc123", "SUCCEEDED", "-", "mnist", "512-10", "2/2", "97.50%", "cpu", "alice"
    ]  # fmt: skip
    assert anonymous.split()[-1] == "-"


def test_a_resumed_jobs_result_names_the_steps_its_seconds_timed():
    figures = dict(test_accuracy=0.97, steps=3750, train_seconds=10.0, examples_per_second=9600)
    straight = cli_output.format_result(training_pb2.JobResult(**figures, run_steps=3750))
    resumed = cli_output.format_result(training_pb2.JobResult(**figures, run_steps=1875))
    older_server = cli_output.format_result(training_pb2.JobResult(**figures))
    assert straight.endswith("; 3750 steps in 10.0 s, 9,600 examples/s")
    assert resumed.endswith(
        "; 3750 steps, the last 1875 after resuming, in 10.0 s, 9,600 examples/s"
    )
    assert older_server == straight


def test_load_inputs_reads_npy_and_npz_with_labels(tmp_path):
    images = np.full((3, 28, 28), 255, dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    inputs, labels = cli_inputs.load_inputs(tmp_path / "x.npy")
    # Pixels go to Predict as they are, a quarter of float32's bytes; the server scales them.
    assert inputs.shape == (3, 784) and inputs.dtype == np.uint8 and labels is None
    assert (inputs == 255).all()
    np.save(tmp_path / "f.npy", np.full((2, 4, 4), 0.5, dtype=np.float64))
    inputs, _ = cli_inputs.load_inputs(tmp_path / "f.npy")
    assert inputs.shape == (2, 16) and inputs.dtype == np.float32 and (inputs == 0.5).all()
    np.savez(tmp_path / "t.npz", x_test=images, y_test=np.array([1, 2, 3]))
    inputs, labels = cli_inputs.load_inputs(tmp_path / "t.npz")
    assert labels == [1, 2, 3]
    np.savez(tmp_path / "bad.npz", a=images, b=images)
    with pytest.raises(cli_errors.CliError, match="no inputs"):
        cli_inputs.load_inputs(tmp_path / "bad.npz")
    # A CSV (what a user who pushed one may try) is named as such, not read as a pickle.
    (tmp_path / "rows.csv").write_text("a,b\n1,2\n")
    with pytest.raises(cli_errors.CliError, match="takes a .npy or .npz file"):
        cli_inputs.load_inputs(tmp_path / "rows.csv")


def test_missing_input_file_is_one_line(tmp_path, capsys):
    status = cli_main(["predict", "j", "--address", "127.0.0.1:1", "--input", str(tmp_path / "no")])
    assert status == cli_errors.EXIT_ERROR
    error = capsys.readouterr().err
    assert error.startswith("ntrain: cannot read inputs from") and error.count("\n") == 1


# --- a fake TrainingService on a real gRPC server -------------------------------------------


def event(sequence, *, step=None, state=None):
    message = training_pb2.JobEvent(job_id="job1", sequence=sequence)
    if state is not None:
        message.state_change.state = state
    else:
        message.progress.CopyFrom(progress_message(step if step is not None else sequence))
    return message


def progress_message(step):
    return training_pb2.Progress(
        epoch=1, epochs=1, step=step, steps_per_epoch=6, step_in_epoch=step, loss=0.5
    )


class FlakyService(training_pb2_grpc.TrainingServiceServicer):
    """Drops the first WatchJob stream after three events; the second finishes the job."""

    def __init__(self):
        self.watch_requests: list[int] = []
        self.log_requests: list[int] = []
        self.lock = threading.Lock()

    def WatchJob(self, request, context):
        with self.lock:
            self.watch_requests.append(request.after_sequence)
            attempt = len(self.watch_requests)
        if attempt == 1:
            yield event(1, state=training_pb2.JOB_STATE_RUNNING)
            yield event(2)
            yield event(3)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server went away")
        # A careless server might resend the last event; the client must not show it twice.
        for sequence in range(request.after_sequence, 7):
            if sequence == 6:
                yield event(6, state=training_pb2.JOB_STATE_SUCCEEDED)
            elif sequence:
                yield event(sequence)

    def GetJob(self, request, context):
        if request.job_id != "job1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not found")
        return training_pb2.Job(
            job_id="job1",
            state=training_pb2.JOB_STATE_SUCCEEDED,
            spec=training_pb2.JobSpec(epochs=1),
        )

    def GetJobLogs(self, request, context):
        """Lines "line 0" .. "line 5", 7 bytes each; the first followed stream, and every
        unfollowed one, drops after two lines."""
        with self.lock:
            self.log_requests.append(request.offset)
            drops = len(self.log_requests) == 1 or not request.follow
        for index in range(request.offset // 7, 6):
            if drops and index == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server went away")
            yield training_pb2.LogChunk(lines=[f"line {index}"], next_offset=7 * (index + 1))

    def SubmitJob(self, request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch_size must be positive, got 0")

    def WatchExperiment(self, request, context):
        """Two states, then exp-1's stream ends for renewal (as at --stream-max-age) and
        exp-2's as a server going away; the next stream starts again from the state the
        first was left in."""
        with self.lock:
            self.experiment_requests = getattr(self, "experiment_requests", {})
            attempt = self.experiment_requests.get(request.experiment_id, 0) + 1
            self.experiment_requests[request.experiment_id] = attempt
        states = [training_pb2.Experiment(experiment_id="exp-1", reason=n) for n in "abc"]
        if attempt == 1:
            yield from states[:2]
            if request.experiment_id == "exp-1":
                context.set_trailing_metadata((("ntrain-stream-renew", "1"),))
                context.abort(grpc.StatusCode.UNAVAILABLE, "this stream reached its age limit")
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server went away")
        yield from states[1:]

    MODEL = {"saved_model.pb": b"graph" * 100, "variables/variables.index": b"index"}

    def DownloadModel(self, request, context):
        """The model; the first stream drops after one file, job2's last file arrives damaged."""
        with self.lock:
            self.download_requests = getattr(self, "download_requests", 0) + 1
            attempt = self.download_requests
        for number, (path, data) in enumerate(sorted(self.MODEL.items())):
            if attempt == 1 and number == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server went away")
            digest = hashlib.sha256(data).hexdigest()
            if request.job_id == "job2" and number == 1:
                data = data[:-1] + b"X"
            yield training_pb2.ModelChunk(path=path, data=data, offset=0, sha256=digest)


@pytest.fixture
def fake_server():
    service = FlakyService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    training_pb2_grpc.add_TrainingServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(None)


def test_watch_reconnects_from_the_last_sequence_without_gaps_or_repeats(fake_server):
    service, address = fake_server
    reconnects = []
    with grpc.insecure_channel(address) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        events = client.watch_events(
            stub, "job1", on_reconnect=reconnects.append, sleep=lambda _: None
        )
        sequences = [item.sequence for item in events]
    assert sequences == [1, 2, 3, 4, 5, 6]
    assert service.watch_requests == [0, 3]
    assert reconnects == [3]


@pytest.mark.parametrize(("experiment_id", "told"), [("exp-1", 0), ("exp-2", 1)])
def test_an_experiment_watch_goes_on_without_a_repeat_and_says_so_unless_renewed(
    fake_server, experiment_id, told
):
    service, address = fake_server
    reconnects = []
    with client.Client(address) as api:
        states = api.watch_experiment(experiment_id, on_reconnect=lambda: reconnects.append(1))
        reasons = [experiment.reason for experiment in states]
    assert reasons == ["a", "b", "c"] and service.experiment_requests[experiment_id] == 2
    assert len(reconnects) == told  # a renewal is silent; a lost server is said once


class Renewal(FakeRpcError):
    def __init__(self):
        super().__init__(grpc.StatusCode.UNAVAILABLE, "this stream reached its age limit")

    def trailing_metadata(self):
        return (("ntrain-stream-renew", "1"),)


def test_a_watch_gives_up_after_its_reconnect_time_and_renewals_cost_none_of_it():
    now, slept, told = [0.0], [], []
    answers = iter([Renewal(), Renewal()] + [FakeRpcError(grpc.StatusCode.UNAVAILABLE, "gone")] * 9)

    class DownStub:
        def WatchJob(self, request):
            raise next(answers)

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    events = client.watch_events(
        DownStub(), "job1", after_sequence=4, reconnect_seconds=5.0,
        on_reconnect=told.append, clock=lambda: now[0], sleep=sleep,
    )  # fmt: skip
    with pytest.raises(FakeRpcError) as gave_up:
        list(events)
    assert gave_up.value.details() == "gone" and told == [4]  # said once, at the first loss
    assert slept == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]  # backing off; no wait after a renewal
    assert now[0] == pytest.approx(5.1)


def test_a_followed_log_reconnects_where_it_stopped(fake_server):
    service, address = fake_server
    with client.Client(address) as api:
        lines = list(api.logs("job1", follow=True))
        assert lines == [f"line {index}" for index in range(6)]
        assert service.log_requests == [0, 14]
        with pytest.raises(client.Unavailable):  # only a followed log reconnects
            list(api.logs("job1"))


def test_a_download_that_breaks_off_starts_again_and_checks_every_file(fake_server, tmp_path):
    service, address = fake_server
    with client.Client(address) as api:
        folder = api.download_model("job1", tmp_path / "model")
        assert service.download_requests == 2
        for path, data in FlakyService.MODEL.items():
            assert (folder / path).read_bytes() == data
        with pytest.raises(client.DownloadError, match="arrived damaged"):
            api.download_model("job2", tmp_path / "damaged")
        assert not (tmp_path / "damaged" / "1").exists()  # nothing half-written is left


def test_watch_command_follows_to_the_end_and_exits_0(fake_server, capsys):
    _, address = fake_server
    assert cli_main(["watch", "job1", "--address", address]) == cli_errors.EXIT_OK
    out, err = capsys.readouterr()
    assert err == "ntrain: connection lost; reconnecting from event 3\n"
    assert out.count("RUNNING") == 1 and "SUCCEEDED" in out


def test_logs_command_reconnects_where_it_stopped_and_says_so(fake_server, capsys):
    _, address = fake_server
    assert cli_main(["logs", "-f", "job1", "--address", address]) == cli_errors.EXIT_OK
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"line {index}" for index in range(6)]
    assert err == "ntrain logs: connection lost; reconnecting at byte 14\n"


def test_loopback_addresses_bypass_a_configured_proxy(fake_server, unused_port, monkeypatch):
    _, address = fake_server
    closed = f"http://127.0.0.1:{unused_port}"
    monkeypatch.setenv("https_proxy", closed)
    monkeypatch.setenv("http_proxy", closed)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert cli_main(["watch", "job1", "--address", address]) == cli_errors.EXIT_OK


def test_server_errors_are_one_line_with_status_1(fake_server, capsys):
    _, address = fake_server
    assert cli_main(["watch", "nope", "--address", address]) == cli_errors.EXIT_ERROR
    assert capsys.readouterr().err == "ntrain: not found: job 'nope' not found\n"
    assert cli_main(["train", "--detach", "--address", address]) == cli_errors.EXIT_ERROR
    assert capsys.readouterr().err == (
        "ntrain: invalid request: batch_size must be positive, got 0\n"
    )


def test_unreachable_server_is_one_line_from_the_installed_command(unused_port):
    address = f"127.0.0.1:{unused_port}"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "jobs", "--address", address, "--timeout", "10"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert result.returncode == cli_errors.EXIT_ERROR
    assert (
        result.stderr == f"ntrain: the server is not reachable at {address} (connection refused)\n"
    )
    assert result.stdout == ""


def test_health_of_an_unreachable_server_exits_1(unused_port, capsys):
    assert cli_main(["health", "--address", f"127.0.0.1:{unused_port}"]) == cli_errors.EXIT_ERROR
    assert "not reachable" in capsys.readouterr().err


@pytest.fixture
def unused_port():
    """A port nothing listens on: bound once by us, then released."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served_configs(monkeypatch) -> list:
    """The ServerConfig each `ntrain serve` built, for a server that refuses to start."""
    import service.api.server

    seen = []

    class RefusingServer:
        def __init__(self, config):
            seen.append(config)

        def start(self):
            raise OSError("not starting in a unit test")

        def stop(self, grace=5.0):
            pass

    monkeypatch.setattr(service.api.server, "TrainingServer", RefusingServer)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's own handlers
    return seen


def test_serve_passes_the_job_series_retention_to_the_server(served_configs, capsys):
    from service.cli import main

    seen = served_configs
    assert main(["serve", "--job-series-retention", "30", "--no-metrics"]) == 1
    assert seen[0].job_series_retention_seconds == 30.0
    assert "cannot start the server" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        main(["serve", "--job-series-retention", "-1"])
    assert error.value.code == 2


def test_serve_passes_the_progress_interval_to_the_server(served_configs):
    from service.cli import main
    from service.jobs.controller import PROGRESS_INTERVAL_SECONDS

    seen = served_configs
    assert main(["serve", "--progress-interval", "0", "--no-metrics"]) == 1
    assert main(["serve", "--no-metrics"]) == 1
    assert [config.progress_interval_seconds for config in seen] == [0.0, PROGRESS_INTERVAL_SECONDS]
    with pytest.raises(SystemExit) as error:
        main(["serve", "--progress-interval", "-1"])
    assert error.value.code == 2


def test_serve_passes_the_stream_max_age_to_the_server(served_configs):
    from service.api.streams import MAX_AGE_SECONDS
    from service.cli import main

    seen = served_configs
    assert main(["serve", "--stream-max-age", "0", "--no-metrics"]) == 1
    assert main(["serve", "--no-metrics"]) == 1
    assert [config.stream_max_age_seconds for config in seen] == [0.0, MAX_AGE_SECONDS]
    with pytest.raises(SystemExit) as error:
        main(["serve", "--stream-max-age", "-1"])
    assert error.value.code == 2


def test_serve_passes_the_mlflow_tracking_uri_and_refuses_one_that_is_no_url(served_configs):
    from service.cli import main

    seen = served_configs
    uri = "http://127.0.0.1:5000"
    assert main(["serve", "--mlflow-tracking-uri", uri, "--no-metrics"]) == 1
    assert seen[0].mlflow_tracking_uri == uri
    assert main(["serve", "--no-metrics"]) == 1
    assert seen[1].mlflow_tracking_uri is None

    from service.api.server_config import ServerConfig, check_config

    for bad in ("mlflow:5000", "127.0.0.1:5000", "sqlite:///mlflow.db"):
        config = ServerConfig(port=0, metrics_port=None, mlflow_tracking_uri=bad)
        with pytest.raises(ValueError, match="mlflow tracking uri must be http"):
            check_config(config)
