"""Image decode + resize, the one definition every pipeline (CSV, tf.data shards, benchmarks) uses.

Keeping a single function means the CSV pipeline, the shard reader and the benchmark's bare
loop do exactly the same pixel work, so their outputs agree and throughput ratios are fair.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow as tf

# Antialiasing costs ~15 % over plain bilinear but keeps detail when web images (often 500+ px)
# are shrunk to the encoder's 224 px; DALI's resize antialiases by default as well.
ANTIALIAS = True


def header_pixels(data: bytes) -> np.int64:
    """Width x height from an encoded image's header (Pillow reads only the header), -1 if unknown."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # not an image Pillow knows: the decoder below decides (and counts it)
        return np.int64(-1)
    return np.int64(width) * np.int64(height)


def decode_and_resize(data: tf.Tensor, image_size: int, max_pixels: int | None = None) -> tf.Tensor:
    """Encoded bytes (JPEG, PNG, GIF, BMP, WebP) -> float32 [size, size, 3] in 0..255.

    channels=3 makes grayscale, grayscale+alpha, RGBA and CMYK JPEGs all come out as RGB
    (alpha is dropped); expand_animations=False keeps only a GIF's first frame so every
    image is rank 3; 16-bit PNGs are scaled to 8 bits. Corrupt bytes raise, which the
    pipelines turn into a counted skip; so does an image whose header announces more than
    ``max_pixels`` pixels, refused before it is decoded (a 20000 x 20000 PNG is 1 MB on
    disk and 1.2 GB decoded). :mod:`gpt2_effnet.image_input` reads files the same way.
    """
    checks = []
    if max_pixels is not None:
        pixels = tf.numpy_function(header_pixels, [data], tf.int64, stateful=False)
        checks.append(tf.debugging.assert_less_equal(
            pixels, tf.constant(max_pixels, tf.int64), message="image over train.max_image_pixels"
        ))
    with tf.control_dependencies(checks):
        image = tf.cond(
            tf.io.is_jpeg(data),
            # The accurate integer IDCT is as fast here and matches DALI's CPU decoder bit for bit.
            lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8),
        )
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=ANTIALIAS)
    # Antialiased resampling can overshoot slightly outside the input range.
    image = tf.clip_by_value(image, 0.0, 255.0)
    return tf.ensure_shape(image, [image_size, image_size, 3])
