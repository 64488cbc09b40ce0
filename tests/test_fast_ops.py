"""gpt2_effnet.fast_ops: the same answers as numpy, by a cheaper road."""

from __future__ import annotations

import numpy as np
from keras import ops

from gpt2_effnet.fast_ops import argmax_last


def test_argmax_last_matches_numpy_including_ties() -> None:
    rng = np.random.default_rng(0)
    # Few distinct values, so most rows have ties: numpy (and HF's greedy) take the first.
    for shape in ((5, 9), (2, 3, 7), (1, 50258)):
        x = rng.integers(-3, 3, shape).astype(np.float32)
        got = np.asarray(ops.convert_to_numpy(argmax_last(ops.convert_to_tensor(x))))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    x = np.array([[-1.0, 2.5, 2.5, 0.0], [-0.0, 0.0, -1.0, -2.0]], np.float32)
    np.testing.assert_array_equal(ops.convert_to_numpy(argmax_last(ops.convert_to_tensor(x))), [1, 0])
