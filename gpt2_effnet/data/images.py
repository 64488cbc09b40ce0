"""Image decoding inside tf.data: :func:`gpt2_effnet.image_input.decode_rgb` as a graph op that never fails.

The decode itself is Pillow's (the one every reader uses). Pillow releases the GIL while it
decodes and resizes, so parallel tf.data calls use every core. A sample that does not
decode is not an error here: it comes out as a black image with ``ok = 0``, counted and
named in the pipeline's :class:`~gpt2_effnet.data.pipeline.SkipCounter`, and its batch
row is masked. (``ignore_errors`` would drop it, and a dropped sample shifts every later
position, which exact resume cannot afford.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

    from .pipeline import SkipCounter


def decode_images(
    source: "tf.Tensor",
    name: "tf.Tensor",
    image_size: int,
    max_pixels: int | None,
    skips: "SkipCounter",
    from_path: bool = False,
    usable: "tf.Tensor | None" = None,
) -> tuple["tf.Tensor", "tf.Tensor"]:
    """Graph code for one sample: (uint8 ``[S, S, 3]``, ``ok`` int32).

    ``source`` is the encoded bytes, or a file path with ``from_path``; ``name`` names the
    sample in reports. ``usable == 0`` marks a sample already known bad (and counted).
    """
    import tensorflow as tf

    from ..image_input import decode_rgb

    blank = np.zeros((image_size, image_size, 3), np.uint8)

    def run(data: bytes, label: bytes, good: np.int32) -> tuple[np.ndarray, np.int32]:
        if not good:
            return blank, np.int32(0)
        try:
            if from_path:
                with open(data.decode("utf-8", "surrogateescape"), "rb") as handle:
                    data = handle.read()
            image = decode_rgb(data, image_size, max_pixels)
        except Exception:  # any failure of one file is a counted, named skip
            skips.add_unreadable(label.decode("utf-8", "replace"))
            return blank, np.int32(0)
        skips.add_decoded()
        return image, np.int32(1)

    good = tf.constant(1, tf.int32) if usable is None else tf.cast(usable, tf.int32)
    image, ok = tf.numpy_function(run, [source, name, good], [tf.uint8, tf.int32], stateful=True)
    image.set_shape([image_size, image_size, 3])
    ok.set_shape([])
    return image, ok
