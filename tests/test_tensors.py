"""Predict's tensors: arrays as little-endian C-ordered bytes, and the server's checks of them.

No server here: the client's encoding against bytes laid out by hand, and each
refusal of the server's conversion and checks naming its field (the gRPC
answers to the same requests are in test_inference.py).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from ntrain.v1 import training_pb2 as pb

from ntrain.client.tensors import fill_tensor, tensor_array, tensor_message
from service.api.convert import tensor_from_proto
from service.jobs.errors import InvalidArgument
from service.jobs.validation import MAX_PREDICT_INPUTS, check_predict_tensor


def test_float32_is_sent_little_endian_in_c_order():
    rows = np.array([[1.5, -2.0], [3.25, 1e-3]], dtype=np.float32)
    tensor = tensor_message(rows.T)  # not C-contiguous: sent in the order its indices run

    assert tensor.dtype == pb.DATA_TYPE_FLOAT32 and list(tensor.shape) == [2, 2]
    assert tensor.content == struct.pack("<4f", 1.5, 3.25, -2.0, 1e-3)
    np.testing.assert_array_equal(tensor_array(tensor), rows.T)


def test_big_endian_float32_is_sent_little_endian():
    rows = np.array([[1.5, -2.0]], dtype=">f4")
    assert tensor_message(rows).content == struct.pack("<2f", 1.5, -2.0)


def test_uint8_is_sent_as_it_is():
    rows = np.arange(12, dtype=np.uint8).reshape(3, 4)
    tensor = tensor_message(rows)

    assert tensor.dtype == pb.DATA_TYPE_UINT8 and tensor.content == bytes(range(12))
    np.testing.assert_array_equal(tensor_array(tensor), rows)


def test_a_request_filled_in_place_is_the_request_built_from_a_tensor():
    rows = np.random.default_rng(0).random((5, 7), dtype=np.float32)
    built = pb.PredictRequest(job_id="job-1", tensor=tensor_message(rows))
    filled = pb.PredictRequest(job_id="job-1")
    fill_tensor(filled.tensor, np.zeros((2, 3, 4), np.uint8))  # filled again: nothing stays
    fill_tensor(filled.tensor, rows)
    assert filled.SerializeToString(deterministic=True) == built.SerializeToString(
        deterministic=True
    )


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.bool_])
def test_other_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match="uint8 or float32"):
        tensor_message(np.zeros((1, 2), dtype=dtype))


def tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=(2, 3), content=None) -> pb.Tensor:
    if content is None:
        content = bytes(int(np.prod(shape)) * (1 if dtype == pb.DATA_TYPE_UINT8 else 4))
    return pb.Tensor(dtype=dtype, shape=shape, content=content)


@pytest.mark.parametrize(
    ("message", "field", "words"),
    [
        (tensor(dtype=pb.DATA_TYPE_UNSPECIFIED), "tensor.dtype", "DATA_TYPE_UINT8"),
        (tensor(dtype=99), "tensor.dtype", "got 99"),
        (tensor(shape=(-1, 3), content=b""), "tensor.shape", "negative"),
        (tensor(shape=(1,) * 65, content=bytes(4)), "tensor.shape", "at most 8 dimensions"),
        (tensor(content=bytes(23)), "tensor.content", "24 bytes"),
        (tensor(content=bytes(25)), "tensor.content", "got 25"),
        (tensor(pb.DATA_TYPE_UINT8, content=bytes(24)), "tensor.content", "6 bytes"),
        (tensor(shape=(2**40, 2**40), content=b""), "tensor.content", "bytes"),
    ],
)
def test_a_tensor_whose_bytes_do_not_fit_is_refused_naming_its_field(message, field, words):
    with pytest.raises(InvalidArgument, match=words) as refused:
        tensor_from_proto(message, "tensor")
    assert refused.value.field == field


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ((6,), r"\[examples, 3\].*got \[6\]"),
        ((1, 2, 3), r"got \[1, 2, 3\]"),
        ((3, 2), r"got \[3, 2\]"),
        ((0, 3), "at least one example"),
        ((MAX_PREDICT_INPUTS + 1, 3), "at most"),
    ],
)
def test_a_tensor_of_the_wrong_rank_width_or_count_is_refused(shape, words):
    inputs = tensor_from_proto(tensor(shape=shape), "tensor")
    with pytest.raises(InvalidArgument, match=words) as refused:
        check_predict_tensor(inputs, input_size=3)
    assert refused.value.field == "tensor.shape"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_is_refused_naming_its_example(bad):
    rows = np.zeros((4, 3), dtype=np.float32)
    rows[2, 1] = bad
    inputs = tensor_from_proto(tensor_message(rows), "tensor")
    with pytest.raises(InvalidArgument, match="non-finite value in example 2") as refused:
        check_predict_tensor(inputs, input_size=3)
    assert refused.value.field == "tensor.content"


def test_a_good_tensor_is_read_without_a_copy_of_its_values():
    rows = np.arange(6, dtype=np.uint8).reshape(2, 3)
    message = tensor_message(rows)
    inputs = tensor_from_proto(message, "tensor")
    check_predict_tensor(inputs, input_size=3)
    assert inputs.dtype == np.uint8 and not inputs.flags.writeable  # a view of the bytes
    np.testing.assert_array_equal(inputs, rows)
