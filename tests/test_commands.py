"""describe, logs, model download, names and labels, server defaults: against a real server.

One server and one job trained from a spec that names only its data set (so
the server's defaults are what trained it); the client and the command line
are the real ones.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from ntrain.v1 import training_pb2 as pb

import ntrain.client as client
from naive_model.config import TrainConfig
from naive_model.data import synthetic_dataset
from service.cli.app import main as cli_main

pytestmark = pytest.mark.slow

LABELS = {"suite": "commands", "team.example.com/owner": "ada"}
TINY = [{"units": 10, "activation": "softmax"}]  # one layer: a job that trains in a moment


def run_cli(*argv: str) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(list(argv))
    return SimpleNamespace(status=status, out=out.getvalue(), err=err.getvalue())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from service_harness import RunningServer

    running = RunningServer(tmp_path_factory.mktemp("state"), warm_worker=False)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api(server):
    with client.Client(f"127.0.0.1:{server.server.port}") as connected:
        yield connected


@pytest.fixture(scope="module")
def finished(api) -> pb.Job:
    """A job whose spec names only its data set (plus a name and labels), trained to the end."""
    job = api.submit({"dataset": "synthetic", "name": "defaults", "labels": LABELS})
    ended = api.wait(job.job_id)
    assert ended.state == pb.JOB_STATE_SUCCEEDED, ended.failure_reason
    return ended


def test_a_spec_with_only_a_data_set_trains_with_the_books_defaults(finished):
    book = TrainConfig()
    spec = finished.spec
    assert [(layer.units, layer.activation) for layer in spec.layers] == [
        (layer.units, layer.activation) for layer in book.layers
    ]
    assert (spec.initializer, spec.optimizer.name, spec.optimizer.learning_rate) == (
        book.initializer,
        book.optimizer,
        book.learning_rate,
    )
    assert (spec.batch_size, spec.epochs, spec.strategy.name) == (book.batch_size, 5, "auto")
    assert (spec.checkpoint_every_epochs, spec.max_restarts) == (1, 2)
    assert finished.result.steps == 5 * (2048 // 128)  # 5 epochs of the synthetic set
    assert (spec.name, dict(spec.labels)) == ("defaults", LABELS)


def test_labels_find_jobs_and_bad_fields_come_back_as_field_violations(api, finished):
    assert [job.job_id for job in api.list(labels={"suite": "commands"})] == [finished.job_id]
    assert [job.job_id for job in api.list(labels=LABELS, states=["SUCCEEDED"])] == [
        finished.job_id
    ]
    assert api.list(labels={"suite": "commands", "team.example.com/owner": "bob"}) == []
    with pytest.raises(client.InvalidArgument) as refused:
        api.list(labels={"-bad": "x"})
    assert refused.value.field_violations[0].field.startswith("labels[")

    for spec, field in [
        ({"dataset": "synthetic", "batchSize": 0}, "spec.batch_size"),
        (
            {"dataset": "synthetic", "optimizer": {"learningRate": -1}},
            "spec.optimizer.learning_rate",
        ),
        (
            {
                "dataset": "synthetic",
                "layers": [
                    {"units": 64, "activation": "relu"},
                    {"units": 7, "activation": "softmax"},
                ],
            },
            "spec.layers[1].units",
        ),
        ({"dataset": "synthetic", "labels": {"a": "no spaces"}}, "spec.labels['a']"),
        ({"dataset": "synthetic", "name": "x" * 129}, "spec.name"),
    ]:
        with pytest.raises(client.InvalidArgument) as refused:
            api.submit(spec)
        (violation,) = refused.value.field_violations
        assert violation.field == field, (spec, refused.value)
        assert violation.description == refused.value.details  # the one-line message


def test_describe_shows_the_spec_states_result_and_model(server, finished):
    address = f"127.0.0.1:{server.server.port}"
    described = run_cli("describe", finished.job_id, "--address", address)
    assert described.status == 0, described.err
    text = described.out
    for expected in (
        f"job          {finished.job_id}",
        "name         defaults",
        "labels       suite=commands, team.example.com/owner=ada",
        "state        SUCCEEDED",
        "layers       512:relu,10:softmax (glorot initialiser)",
        "training     5 epochs, batch 128, a whole epoch per compiled call",
        "result:      test accuracy ",
        "model:       784 inputs -> 512:relu,10:softmax, 10 classes, 407,050 parameters",
        f"ntrain model {finished.job_id} -o DIR downloads it",
    ):
        assert expected in text, (expected, text)
    transitions = text.split("transitions:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    states = [line.split()[3] for line in transitions[1:]]  # date, time, zone, state
    assert states == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"], transitions
    as_json = json.loads(run_cli("describe", finished.job_id, "--json", "--address", address).out)
    assert as_json["model"]["exported"] is True and as_json["model"]["input_size"] == 784


def test_logs_are_the_workers_and_follow_ends_with_the_job(server, api, finished):
    lines = list(api.logs(finished.job_id))
    assert any(line.endswith(" worker: strategy: OneDeviceStrategy over CPU:0") for line in lines)
    printed = run_cli("logs", finished.job_id, "--address", f"127.0.0.1:{server.server.port}")
    assert printed.status == 0 and printed.out.splitlines() == lines

    job = api.submit({"dataset": "synthetic", "layers": TINY, "epochs": 2})
    followed = list(api.logs(job.job_id, follow=True))  # returns once the job has ended
    assert api.get(job.job_id).state == pb.JOB_STATE_SUCCEEDED
    assert followed == list(api.logs(job.job_id)) and len(followed) >= 3


def test_logs_of_a_finished_job_show_its_training(server, finished):
    printed = run_cli("logs", finished.job_id, "--address", f"127.0.0.1:{server.server.port}")
    assert printed.status == 0, printed.err
    training = [
        line.split(" worker: ", 1)[1] for line in printed.out.splitlines() if " worker: " in line
    ]
    progress = [line for line in training if line.startswith("epoch ") and " step " in line]
    # One line per compiled call: a first call of one step, then whole epochs of 16.
    assert progress[0].startswith("epoch 1/5 step 1/16 (global 1): loss ")
    assert progress[-1].startswith("epoch 5/5 step 16/16 (global 80): loss ")
    assert all(" accuracy " in line and line.endswith(" examples/s") for line in progress)
    for epoch in range(1, 6):
        (ended,) = [line for line in training if line.startswith(f"epoch {epoch} ended after ")]
        assert "; evaluation loss " in ended, ended
        assert any(line.startswith(f"checkpoint saved at epoch {epoch} ") for line in training)
    accuracy = f"{finished.result.test_accuracy:.2%}"
    assert training[-1].startswith("training finished: test loss ")
    assert f" accuracy {accuracy}; 80 steps in " in training[-1]
    assert training[-1].endswith("; model exported")


def test_logs_of_a_diverged_job_end_with_why_it_failed(api):
    spec = {
        "dataset": "synthetic",
        "layers": [{"units": 64, "activation": "relu"}, *TINY],
        "optimizer": {"name": "sgd", "learningRate": 1e20},
        "epochs": 1,
    }
    job = api.wait(api.submit(spec).job_id)
    assert job.state == pb.JOB_STATE_FAILED
    lines = list(api.logs(job.job_id))
    assert lines[-1].endswith(f" worker: training failed: {job.failure_reason}"), lines[-3:]
    assert any(" worker: epoch 1/1 step " in line for line in lines)


def test_log_offsets_past_the_end_and_a_linked_log_are_refused(server, api, finished, caplog):
    caplog.set_level(logging.INFO)
    size = sum(len(line.encode()) + 1 for line in api.logs(finished.job_id))
    for offset, follow in [(size + 1, False), (2**62, True), (2**63 - 1, False)]:
        request = pb.GetJobLogsRequest(job_id=finished.job_id, offset=offset, follow=follow)
        with pytest.raises(grpc.RpcError) as refused:
            list(server.stub.GetJobLogs(request, timeout=30))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == (
            f"offset must be at most the log's size ({size} bytes), got {offset}"
        )
    assert list(api.logs(finished.job_id, offset=size)) == []

    job = api.submit({"dataset": "synthetic", "layers": TINY, "epochs": 1})
    assert api.wait(job.job_id).state == pb.JOB_STATE_SUCCEEDED
    files = server.manager.store.job_files(job.job_id)
    secret = files.root.parent.parent / "secret.txt"
    secret.write_text("SECRET\n")
    files.train_log.unlink()
    files.train_log.symlink_to(secret)
    with pytest.raises(client.FailedPrecondition, match="train.log is not a regular file"):
        list(api.logs(job.job_id))
    model = files.model.rename(files.root / "model.real")
    files.model.symlink_to(model)
    with pytest.raises(client.FailedPrecondition, match="is a symbolic link"):
        api.download_model(job.job_id, files.root.parent.parent / "downloads")
    assert "Traceback" not in caplog.text


def test_get_job_reads_a_jobs_model_once_until_the_job_changes(server, api, finished):
    first = api.get(finished.job_id)
    assert first.model.exported and first.model.input_size == 784
    info = server.manager.store.job_files(finished.job_id).model_info
    saved = info.read_text()
    info.unlink()  # GetJob no longer reads it: the job has not changed since
    try:
        assert api.get(finished.job_id).model == first.model
    finally:
        info.write_text(saved)

    job = api.submit({"dataset": "synthetic", "layers": TINY, "epochs": 1})
    seen = [api.get(job.job_id)]  # queued or just starting: no model, and that is kept too
    assert not seen[0].model.exported
    api.wait(job.job_id)
    ended = api.get(job.job_id)  # the job changed: its model is read again
    assert ended.model.exported and ended.model.num_classes == 10


def test_the_downloaded_model_predicts_as_the_server_does(server, api, finished, tmp_path):
    folder = api.download_model(finished.job_id, tmp_path / "models")
    assert folder == tmp_path / "models" / "1"
    assert (folder / "saved_model.pb").is_file() and (folder / "variables").is_dir()
    assert [path.name for path in (tmp_path / "models").iterdir()] == ["1"]  # no leftovers
    with pytest.raises(FileExistsError):
        api.download_model(finished.job_id, tmp_path / "models")
    written = run_cli(
        "model", finished.job_id, "-o", str(tmp_path / "models"), "--version", "2",
        "--address", f"127.0.0.1:{server.server.port}",
    )  # fmt: skip
    assert written.status == 0, written.err
    assert f"SavedModel in {tmp_path / 'models' / '2'}" in written.out

    inputs = synthetic_dataset().x_test[:16]  # (16, 784)
    np.save(tmp_path / "inputs.npy", inputs)
    expected = api.predict(finished.job_id, inputs)
    load = textwrap.dedent(
        f"""
        import numpy as np, tensorflow as tf
        serve = tf.saved_model.load({str(folder)!r}).signatures["serving_default"]
        inputs = tf.constant(np.load({str(tmp_path / "inputs.npy")!r}))
        np.save({str(tmp_path / "loaded.npy")!r}, serve(inputs=inputs)["probabilities"].numpy())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", load], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "loaded.npy"), expected, rtol=1e-5, atol=1e-6)


def test_a_job_without_a_model_cannot_be_downloaded_and_eval_points_to_checkpoint(
    server, api, tmp_path
):
    job = api.submit({"dataset": "synthetic", "epochs": 100_000, "layers": TINY})
    assert api.cancel(job.job_id).state == pb.JOB_STATE_CANCELED
    with pytest.raises(client.FailedPrecondition, match="already ended CANCELED"):
        api.cancel(job.job_id)
    with pytest.raises(client.FailedPrecondition, match="has no trained model"):
        api.download_model(job.job_id, tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []  # the partial folder is gone
    evaluated = run_cli("eval", job.job_id, "--address", f"127.0.0.1:{server.server.port}")
    assert evaluated.status == 1 and evaluated.err.count("\n") == 1
    assert evaluated.err.rstrip().endswith(
        f"ntrain eval {job.job_id} --checkpoint evaluates its latest checkpoint"
    )
