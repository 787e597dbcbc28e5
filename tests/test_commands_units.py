"""The pieces of describe, logs, model download, labels and server defaults, without a server."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from ntrain.v1 import training_pb2 as pb

import ntrain.client as client
from naive_model.config import TrainConfig
from service.api import convert
from service.api.status_codes import bad_request_status
from service.cli import commands, output, parser
from service.cli.describe import describe_job
from service.jobs import validation
from service.jobs.errors import InvalidArgument
from service.jobs.outputs import LOG_CHUNK_BYTES, model_parts, read_log_lines
from service.protocol import JobSpec

# -- server defaults and field violations -------------------------------------------------


def test_a_spec_with_only_a_data_set_takes_the_books_defaults():
    assert convert.job_spec_from_proto(pb.JobSpec(dataset="mnist")) == JobSpec(
        train=TrainConfig(), dataset="mnist"
    )
    # A number given is taken as given: an explicit zero is refused later, not defaulted.
    explicit = convert.job_spec_from_proto(
        pb.JobSpec(dataset="mnist", batch_size=0, epochs=0, optimizer={"learning_rate": 0})
    )
    assert (explicit.train.batch_size, explicit.train.epochs, explicit.train.learning_rate) == (
        0,
        0,
        0.0,
    )
    # The spec a job reports has every default filled in, and converts back to itself.
    back = convert.job_spec_to_proto(convert.job_spec_from_proto(pb.JobSpec(dataset="mnist")))
    assert convert.job_spec_from_proto(back) == JobSpec(train=TrainConfig(), dataset="mnist")
    assert back.HasField("batch_size") and back.batch_size == 128


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("batch_size must be positive, got 0", "batch_size"),
        ("layers[1].units must be the data set's 10 classes, got 7", "layers[1].units"),
        ("inputs[3] holds a non-finite value", "inputs[3]"),
        ("the request is odd", ""),
    ],
)
def test_an_invalid_argument_names_its_field_from_its_message(message, field):
    assert InvalidArgument(message).field == field


def test_fields_are_named_by_their_path_in_the_request():
    with pytest.raises(InvalidArgument) as raised, convert.fields_under("spec"):
        raise InvalidArgument("learning_rate must be a positive finite number, got -1.0")
    assert raised.value.field == "spec.optimizer.learning_rate"
    status = bad_request_status(raised.value)
    assert status.code.name == "INVALID_ARGUMENT" and "learning_rate" in status.details
    assert any(key == "grpc-status-details-bin" for key, _ in status.trailing_metadata)


@pytest.mark.parametrize(
    "labels",
    [
        (("-a", "b"),),
        (("a" * 64, "b"),),
        (("Team.Example/a", "b"),),  # a prefix is a lowercase DNS name
        (("a", "b c"),),
        (("a", "b" * 64),),
        tuple((f"k{index}", "") for index in range(validation.MAX_LABELS + 1)),
    ],
)
def test_labels_outside_the_kubernetes_rules_are_refused(labels):
    with pytest.raises(InvalidArgument, match="labels"):
        validation.check_labels(labels)


def test_labels_inside_the_kubernetes_rules_pass():
    validation.check_labels(
        (("a", ""), ("team.example.com/owner", "ada"), ("A_b.c-9", "x" * 63), ("k" * 63, "v"))
    )


# -- logs and model files ---------------------------------------------------------------------


def test_log_lines_come_whole_and_bounded(tmp_path):
    log = tmp_path / "train.log"
    assert read_log_lines(log, 0, final=False) is None  # not written yet
    log.write_bytes(b"one\ntwo\nthr")
    first = read_log_lines(log, 0, final=False)
    assert first.lines == ("one", "two") and first.next_offset == 8
    assert read_log_lines(log, 8, final=False) is None  # "thr" is still being written
    assert read_log_lines(log, 8, final=True).lines == ("thr",)  # the job has ended
    log.write_bytes(b"x" * (LOG_CHUNK_BYTES + 10) + b"\n")
    cut = read_log_lines(log, 0, final=False)
    assert cut.lines == ("x" * LOG_CHUNK_BYTES,) and cut.next_offset == LOG_CHUNK_BYTES
    assert read_log_lines(log, cut.next_offset, final=False).lines == ("x" * 10,)


def test_model_files_come_in_order_in_bounded_pieces(tmp_path, monkeypatch):
    import service.jobs.outputs as outputs

    monkeypatch.setattr(outputs, "MODEL_CHUNK_BYTES", 4)
    (tmp_path / "variables").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"0123456789")
    (tmp_path / "variables" / "empty").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "saved_model.pb")
    parts = [(part.path, part.data, part.offset) for part in model_parts(tmp_path)]
    assert parts == [
        ("saved_model.pb", b"0123", 0),
        ("saved_model.pb", b"4567", 4),
        ("saved_model.pb", b"89", 8),
        ("variables/empty", b"", 0),
    ]


def test_the_client_refuses_a_model_path_outside_its_folder(tmp_path):
    for path in ("../x", "/etc/passwd", "a/../../x", "", "a//b", "./a", "a\\..\\b", "a/./b"):
        with pytest.raises(client.DownloadError, match="outside the folder"):
            client.model_file_destination(tmp_path, path)
    assert client.model_file_destination(tmp_path, "variables/v.index") == (
        tmp_path / "variables" / "v.index"
    )


# -- the command line -----------------------------------------------------------------------


def test_train_sends_the_job_file_with_the_flags_given_over_it(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(
        json.dumps(
            {
                "dataset": "synthetic",
                "epochs": 3,
                "batchSize": 64,
                "optimizer": {"name": "sgd", "learningRate": 0.5},
                "labels": {"team": "vision", "stage": "dev"},
            }
        )
    )
    args = parser.build_parser().parse_args(
        ["train", "-f", str(path), "--epochs", "1", "--lr", "0.1", "--label", "stage=prod",
         "--label", "run=7", "--name", "small"]
    )  # fmt: skip
    spec = commands.build_job_spec(args)
    assert (spec.dataset, spec.epochs, spec.batch_size) == ("synthetic", 1, 64)
    assert (spec.optimizer.name, spec.optimizer.learning_rate) == ("sgd", 0.1)
    assert dict(spec.labels) == {"team": "vision", "stage": "prod", "run": "7"}
    assert spec.name == "small" and not spec.layers  # the server's default layers


def test_a_yaml_job_file_reads_as_its_json_twin(tmp_path, monkeypatch):
    pytest.importorskip("yaml")  # a dev dependency; the client needs it for YAML only
    path = tmp_path / "job.yaml"
    path.write_text("dataset: synthetic\nepochs: 2\nlabels:\n  team: vision\n")
    expected = pb.JobSpec(dataset="synthetic", epochs=2, labels={"team": "vision"})
    assert client.job_spec(path) == expected
    monkeypatch.setitem(sys.modules, "yaml", None)  # as where PyYAML is not installed
    with pytest.raises(client.InvalidArgument, match=r"needs PyYAML \(pip install pyyaml\)"):
        client.job_spec(path)


def test_train_without_flags_sends_only_the_data_set():
    spec = commands.build_job_spec(parser.build_parser().parse_args(["train"]))
    assert spec == pb.JobSpec(dataset="mnist")


def test_a_label_flag_must_be_key_equals_value(capsys):
    with pytest.raises(SystemExit):
        parser.build_parser().parse_args(["jobs", "--label", "novalue"])
    assert "must look like KEY=VALUE, got 'novalue'" in capsys.readouterr().err


def test_times_carry_their_zone_and_counts_their_plural():
    stamp = Timestamp(seconds=int(datetime(2026, 11, 29, 12, 30, tzinfo=UTC).timestamp()))
    shown = output.format_time(stamp)
    local = datetime.fromtimestamp(stamp.seconds, tz=UTC).astimezone()
    assert shown == local.strftime("%Y-%m-%d %H:%M:%S ") + local.tzname()
    assert (output.plural(1, "epoch"), output.plural(2, "epoch")) == ("1 epoch", "2 epochs")


def test_describe_says_when_there_is_no_model_yet():
    job = pb.Job(
        job_id="job-1",
        state=pb.JOB_STATE_QUEUED,
        spec=pb.JobSpec(dataset="mnist", epochs=1, batch_size=128),
        transitions=[pb.StateTransition(state=pb.JOB_STATE_QUEUED, reason="")],
    )
    text = describe_job(job)
    assert "training     1 epoch, batch 128" in text
    assert "model:       none yet" in text and "owner        - " in text


def test_completion_scripts_come_from_shtab(capsys):
    pytest.importorskip("shtab")
    from service.cli.app import main

    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete" in script and "describe" in script and "--label" in script


def test_an_address_with_a_scheme_is_one_line_with_status_2(capsys):
    from service.cli.app import main

    assert main(["jobs", "--address", "http://127.0.0.1:50551"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "without a scheme, not 'http://127.0.0.1:50551'" in error
