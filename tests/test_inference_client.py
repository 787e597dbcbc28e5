"""Predict's examples built from the rows' bytes equal those built value by value."""

from __future__ import annotations

import numpy as np
import pytest
from ntrain.v1 import training_pb2 as pb

from ntrain.client.client import example_messages


@pytest.mark.parametrize("features", [0, 1, 31, 32, 784, 40_000])  # lengths of 1, 2 and 3 bytes
def test_examples_from_bytes_equal_examples_from_values(features):
    rng = np.random.default_rng(features)
    rows = rng.normal(size=(3, features)).astype(np.float32)
    rows[0, :2] = [np.inf, np.nan][: min(2, features)]  # sent as they are: the server refuses them

    built = example_messages(rows)

    expected = [pb.Example(values=row.tolist()) for row in rows]
    assert [m.SerializeToString() for m in built] == [m.SerializeToString() for m in expected]
    for message, row in zip(built, rows, strict=True):
        np.testing.assert_array_equal(np.asarray(message.values, dtype=np.float32), row)


def test_any_float_array_is_sent_as_float32_rows():
    rows = np.arange(12, dtype=np.float64).reshape(4, 3)[::2]  # not contiguous, float64
    built = example_messages(rows)
    assert [list(m.values) for m in built] == [[0.0, 1.0, 2.0], [6.0, 7.0, 8.0]]
