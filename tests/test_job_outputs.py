"""What a job left in its folder, as GetJobLogs and DownloadModel read it: never through a link.

Plain files in a temporary folder; no server (the RPCs over a real server are
in test_commands and test_streams).
"""

from __future__ import annotations

import os

import pytest

from naive_model.results import CheckpointSaved, EpochEnd, Progress, Resumed, TrainingResult
from service.jobs.errors import FailedPrecondition, Unavailable
from service.jobs.outputs import log_size, model_parts, read_log_lines
from service.worker.training_log import describe_event


@pytest.fixture
def outside(tmp_path):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("SECRET\n")
    return secret


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "job" / "model"
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    (folder / "variables" / "variables.index").write_bytes(b"index")
    return folder


def test_a_log_that_is_a_link_or_a_folder_is_refused(tmp_path, outside):
    log = tmp_path / "train.log"
    log.symlink_to(outside)
    with pytest.raises(FailedPrecondition, match="train.log is not a regular file"):
        read_log_lines(log, 0, final=True)
    with pytest.raises(FailedPrecondition):
        log_size(log)
    log.unlink()
    log.mkdir()
    with pytest.raises(FailedPrecondition, match="train.log is not a regular file"):
        read_log_lines(log, 0, final=True)


def test_a_log_is_read_from_its_offset_and_its_size_bounds_the_offset(tmp_path):
    log = tmp_path / "train.log"
    assert log_size(log) == 0 and read_log_lines(log, 0, final=False) is None
    log.write_text("one\ntwo\nthr")
    assert log_size(log) == 11
    lines = read_log_lines(log, 4, final=False)
    assert lines is not None and lines.lines == ("two",) and lines.next_offset == 8
    assert read_log_lines(log, 11, final=True) is None


def test_links_in_the_model_are_not_followed(model, outside):
    (model / "leak.txt").symlink_to(outside)
    (model / "variables" / "linked").symlink_to(outside.parent)
    paths = {part.path for part in model_parts(model)}
    assert paths == {"saved_model.pb", "variables/variables.index"}


def test_a_model_folder_that_is_a_link_is_refused(model, tmp_path):
    linked = tmp_path / "job" / "linked-model"
    linked.symlink_to(model)
    with pytest.raises(FailedPrecondition, match="is a symbolic link"):
        model_parts(linked)


def test_a_model_replaced_while_it_is_sent_ends_unavailable(model):
    parts = model_parts(model)
    first = next(parts)
    assert first.path == "saved_model.pb"
    os.remove(model / "variables" / "variables.index")  # as an export's rmtree would
    os.rmdir(model / "variables")  # ... and the new export is not renamed into place yet
    with pytest.raises(Unavailable, match="download it again"):
        list(parts)


def test_every_loop_event_is_one_readable_log_line():
    progress = Progress(
        epoch=2, epochs=5, step=30, steps_per_epoch=16, step_in_epoch=14, loss=0.31234,
        accuracy=0.9123, examples_per_second=12345.6, examples=3840,
    )  # fmt: skip
    assert describe_event(progress) == (
        "epoch 2/5 step 14/16 (global 30): loss 0.3123 accuracy 91.23%, 12,346 examples/s"
    )
    evaluated = EpochEnd(
        epoch=2, train_loss=0.3, train_accuracy=0.9, eval_loss=0.25, eval_accuracy=0.925,
        seconds=1.5,
    )  # fmt: skip
    assert describe_event(evaluated) == (
        "epoch 2 ended after 1.50 s: train loss 0.3000 accuracy 90.00%; "
        "evaluation loss 0.2500 accuracy 92.50%"
    )
    not_evaluated = EpochEnd(
        epoch=3, train_loss=0.3, train_accuracy=0.9, eval_loss=None, eval_accuracy=None,
        seconds=1.0,
    )  # fmt: skip
    assert "evaluation" not in describe_event(not_evaluated)
    saved = CheckpointSaved(path="/c/ckpt-2", epoch=2, step=32, seconds=0.1, step_in_epoch=3)
    assert describe_event(saved) == (
        "checkpoint saved at epoch 2 + 3 steps (global step 32) in 0.10 s: /c/ckpt-2"
    )
    resumed = Resumed(path="/c/ckpt-2", epoch=2, step=32)
    assert describe_event(resumed) == (
        "resumed from the checkpoint at epoch 2 (global step 32): /c/ckpt-2"
    )
    result = TrainingResult(
        train_loss=0.2, train_accuracy=0.95, test_loss=0.21, test_accuracy=0.94, steps=80,
        train_seconds=4.0, examples_per_second=2560.0, has_model=True,
    )  # fmt: skip
    assert describe_event(result) == (
        "training finished: test loss 0.2100 accuracy 94.00%; 80 steps in 4.00 s, "
        "2,560 examples/s; model exported"
    )
