"""Operations that ``keras.ops`` makes dearer than they need be on one backend, written once.

Layers, losses and samplers stay backend-agnostic by calling these instead.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def argmax_last(x: Any) -> Any:
    """int32 index of the largest value along the last axis (the first, on ties).

    ``keras.ops.argmax`` on TensorFlow first rewrites every -0.0 as the smallest negative
    float (a flush-to-zero fix made for JAX): three more passes over the array, which for
    a training step's ``[150, 50258]`` logits cost twice the argmax itself (8.9 vs 2.9 ms,
    AMD EPYC 2 cores). Logits never need -0.0 told from 0.0.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.argmax(x, axis=-1, output_type=tf.int32)
    return ops.cast(ops.argmax(x, axis=-1), "int32")
