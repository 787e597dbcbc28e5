"""Request checks that need no server: page tokens, repeated-field bounds, echoed values."""

from __future__ import annotations

import pytest
from ntrain.v1 import training_pb2 as pb

from naive_model.config import shown
from service.api import convert
from service.api.status import one_line
from service.jobs import validation
from service.jobs.errors import InvalidArgument


@pytest.mark.parametrize("cursor", [1, 12345, 2**63 - 1])
def test_a_page_token_gives_back_its_cursor(cursor):
    token = validation.page_token(cursor)
    assert token.isascii() and len(token) == 20
    assert validation.check_page(0, token) == (validation.DEFAULT_PAGE_SIZE, cursor)


def _flipped(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


@pytest.mark.parametrize(
    "token",
    [
        "\u00b2",  # a Unicode digit: str.isdigit() says yes, int() says no
        "\uff11\uff12",  # fullwidth digits
        "12345",  # the old decimal form
        "1" * 20,
        "abc",
        "x" * 100_000,
        _flipped(validation.page_token(7)),
        validation.page_token(7) + "=",
        validation.page_token(0),  # checksummed, but no cursor this server gives
    ],
)
def test_a_page_token_this_server_did_not_make_is_invalid(token):
    with pytest.raises(InvalidArgument, match="page_token") as raised:
        validation.check_page(0, token)
    assert len(raised.value.message) < 250


def test_repeated_fields_are_bounded_before_any_work():
    with pytest.raises(InvalidArgument, match="at most 64 job states, got 250000"):
        convert.states_from_proto([pb.RUNNING] * 250_000)
    assert convert.states_from_proto([pb.RUNNING, pb.QUEUED, pb.RUNNING]) == ("RUNNING", "QUEUED")
    layers = [pb.LayerSpec(units=1, activation="relu")] * 100_000
    with pytest.raises(InvalidArgument, match="at most 64 layers, got 100000"):
        convert.job_spec_from_proto(pb.JobSpec(layers=layers))
    with pytest.raises(InvalidArgument, match="at most 10000 examples, got 10001"):
        validation.check_predict_count(10_001)
    with pytest.raises(InvalidArgument, match="at least one example"):
        validation.check_predict_count(0)


def test_echoed_values_are_cut_to_about_100_characters():
    assert shown("relu") == "'relu'"
    long = shown("g" * 1_000_000)
    assert len(long) < 140 and long.endswith("... (1000000 characters)")
    with pytest.raises(InvalidArgument) as raised:
        validation.check_job_id("j" * 1_000_000)
    assert len(raised.value.message) < 250
    assert one_line("two\nlines  here") == "two lines here"
    assert len(one_line("x" * 10**6)) <= 1003
