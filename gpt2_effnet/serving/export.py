"""A TensorFlow SavedModel that captions encoded images with nothing of ours installed.

``serving_default`` takes ``images``: a ``tf.string`` vector of encoded files (JPEG, PNG,
GIF, BMP, WebP; any size) and returns, per image, ``captions`` (UTF-8 strings),
``token_ids`` (``int32 [N, max_new_tokens]``, EOS then padding after the caption),
``scores`` and ``ok``. Everything happens inside the graph: decoding and resizing (in
TensorFlow ops that follow :func:`gpt2_effnet.image_input.decode_rgb`, the reader training
and captioning use: JPEGs decoded at libjpeg's reduced scales where Pillow's would be, an
antialiased bilinear resize, rounded to whole levels), the encoder,
the compiled decode loop with its static cache (greedy, beam or sampling, fixed at export
time) and detokenisation by table lookup. A row whose bytes do not decode (or whose header
announces more than ``train.max_image_pixels`` pixels, for JPEG/PNG/GIF/BMP) gets an empty
caption and ``ok = False``; the rest of the batch is captioned. Images are captioned in
chunks of ``batch_size`` (the loop is traced once, at that static size).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..atomic import atomic_folder
from ..captioner import Captioner
from ..decoding.api import decode_function, make_config
from ..decoding.precision import HEAD_ONLY
from ..tokenizer import GPT2Tokenizer


def _u32(data: tf.Tensor, start: int, little: bool) -> tf.Tensor:
    raw = tf.io.decode_raw(tf.strings.substr(data, start, 4), tf.uint8)
    raw = tf.cast(raw, tf.int64)
    order = [0, 1, 2, 3] if little else [3, 2, 1, 0]
    return sum(raw[i] * (256**k) for k, i in enumerate(order))


def _u16(data: tf.Tensor, start: int, little: bool) -> tf.Tensor:
    raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, 2), tf.uint8), tf.int64)
    return raw[0] + 256 * raw[1] if little else raw[1] + 256 * raw[0]


def header_pixels(data: tf.Tensor) -> tf.Tensor:
    """Pixels announced by a JPEG/PNG/GIF/BMP header, in plain TensorFlow ops (-1: other or unknown).

    The training pipeline asks Pillow (a py-function); a SavedModel cannot carry Python.
    """
    length = tf.strings.length(data)
    magic = tf.strings.substr(data, 0, 8)

    def jpeg() -> tf.Tensor:
        shape = tf.cast(tf.image.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    def png() -> tf.Tensor:
        return _u32(data, 16, False) * _u32(data, 20, False)

    def gif() -> tf.Tensor:
        return _u16(data, 6, True) * _u16(data, 8, True)

    def bmp() -> tf.Tensor:
        return tf.abs(_u32(data, 18, True) * _u32(data, 22, True))

    enough = length >= 26
    return tf.case(
        [
            (tf.logical_and(length >= 4, tf.io.is_jpeg(data)), jpeg),
            (tf.logical_and(enough, tf.equal(magic, b"\x89PNG\r\n\x1a\n")), png),
            (tf.logical_and(enough, tf.equal(tf.strings.substr(magic, 0, 3), b"GIF")), gif),
            (tf.logical_and(enough, tf.equal(tf.strings.substr(magic, 0, 2), b"BM")), bmp),
        ],
        default=lambda: tf.constant(-1, tf.int64),
    )


def _jpeg_scale(data: tf.Tensor, size: int) -> tf.Tensor:
    """The reduced scale (1, 2, 4 or 8) Pillow's ``draft`` picks for a JPEG bound for ``size`` px."""
    shape = tf.image.extract_jpeg_shape(data)
    fits = tf.minimum(shape[0] // size, shape[1] // size)
    return tf.case([(fits >= 8, lambda: 8), (fits >= 4, lambda: 4), (fits >= 2, lambda: 2)], default=lambda: 1)


def decode_and_resize(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded bytes (JPEG, PNG, GIF, BMP, WebP) -> float32 ``[S, S, 3]`` of whole levels in 0..255.

    TensorFlow ops only (a SavedModel carries no Python), reproducing
    :func:`gpt2_effnet.image_input.decode_rgb`: libjpeg's accurate integer IDCT at the scale
    Pillow's draft mode would choose, three channels, an animation's first frame, then an
    antialiased bilinear resize (tests bound the difference to Pillow's at one level).
    """

    def jpeg() -> tf.Tensor:
        scale = _jpeg_scale(data, image_size)
        branches = {r: (lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE"))
                    for r in (1, 2, 4, 8)}
        return tf.switch_case(tf.cast(tf.math.log(tf.cast(scale, tf.float32)) / tf.math.log(2.0) + 0.5, tf.int32),
                              [branches[1], branches[2], branches[4], branches[8]])

    image = tf.cond(
        tf.io.is_jpeg(data),
        jpeg,
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8),
    )
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
    image = tf.round(tf.clip_by_value(image, 0.0, 255.0))
    return tf.ensure_shape(image, [image_size, image_size, 3])


class CaptionModule:
    """What the export traces: the captioner, its decode settings, the vocabulary table."""

    def __init__(
        self,
        model: Captioner,
        tokenizer: GPT2Tokenizer,
        batch_size: int = 8,
        seed: int = 0,
        **generation: Any,
    ) -> None:
        self.model = model
        generation.setdefault("eos_token_id", tokenizer.eos_token_id)
        self.config = make_config(model, **generation)
        if self.config.num_return_sequences != 1:
            raise ValueError("the export returns one caption per image (num_return_sequences 1)")
        if self.config.precision == HEAD_ONLY:
            # Its head is an XLA program, which TF Serving's CPU build refuses to run.
            raise ValueError("the export cannot decode with precision='bfloat16-head' (an XLA program)")
        self._run = decode_function(model, self.config)
        cfg = model.captioner_config
        self.image_size = cfg.model.image_size
        self.max_pixels = cfg.train.max_image_pixels
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.bos = model.decoder.gpt2_config.vocab_size
        table = tokenizer.token_bytes()
        width = model.decoder.total_vocab_size
        self.token_bytes = tf.constant((table + [b""] * width)[:width], dtype=tf.string)

    def _decode_all(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``[N]`` encoded -> (pixels ``[N, S, S, 3]``, ok ``[N]``); bad rows are zeros and not ok."""
        size, limit = self.image_size, self.max_pixels
        count = tf.shape(images)[0]

        def decode(index: tf.Tensor, data: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            check = tf.debugging.assert_less_equal(header_pixels(data), tf.constant(limit, tf.int64))
            with tf.control_dependencies([check]):
                return index, decode_and_resize(data, size)

        rows = tf.data.Dataset.from_tensor_slices((tf.range(count), images)).map(decode).ignore_errors()
        sentinel = tf.data.Dataset.from_tensors((tf.constant(-1), tf.zeros([size, size, 3], tf.float32)))
        index, pixels = rows.concatenate(sentinel).batch(tf.cast(count, tf.int64) + 1).get_single_element()
        index, pixels = index[:-1], pixels[:-1]
        ok = tf.scatter_nd(index[:, None], tf.ones_like(index, tf.bool), [count])
        pixels = tf.scatter_nd(index[:, None], pixels, [count, size, size, 3])
        return pixels, ok

    def _caption_chunks(self, pixels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch, size = self.batch_size, self.image_size
        count = tf.shape(pixels)[0]
        padded = tf.concat([pixels, tf.zeros([(-count) % batch, size, size, 3], tf.float32)], axis=0)
        chunks = tf.shape(padded)[0] // batch
        prompt = tf.fill([batch, 1], self.bos)
        new = self.config.max_new_tokens
        ids = tf.TensorArray(tf.int32, size=chunks, element_shape=[batch, new])
        scores = tf.TensorArray(tf.float32, size=chunks, element_shape=[batch])

        def body(chunk: tf.Tensor, ids: tf.TensorArray, scores: tf.TensorArray) -> tuple:
            images = tf.ensure_shape(padded[chunk * batch : (chunk + 1) * batch], [batch, size, size, 3])
            out = self._run(prompt, images, tf.constant(self.seed, tf.int32))
            sequences = tf.cast(out["sequences"], tf.int32)[:, 1 : 1 + new]
            ids = ids.write(chunk, tf.ensure_shape(sequences, [batch, new]))
            scores = scores.write(chunk, tf.cast(out["scores"], tf.float32))
            return chunk + 1, ids, scores

        _, ids, scores = tf.while_loop(lambda chunk, *_: chunk < chunks, body, (tf.constant(0), ids, scores))
        return ids.concat()[:count], scores.concat()[:count]

    def _detokenize(self, ids: tf.Tensor) -> tf.Tensor:
        eos = self.config.eos_token_id
        keep = tf.ones_like(ids, tf.bool)
        if eos is not None:
            keep = tf.equal(tf.cumsum(tf.cast(tf.equal(ids, eos), tf.int32), axis=1), 0)
        pieces = tf.where(keep, tf.gather(self.token_bytes, ids), "")
        text = tf.strings.reduce_join(pieces, axis=1)
        text = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)
        return tf.strings.strip(text)

    def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        """The serving function (traced by the export, with AutoGraph off)."""
        pixels, ok = self._decode_all(images)
        ids, scores = self._caption_chunks(pixels)
        captions = tf.where(ok, self._detokenize(ids), "")
        pad = self.config.pad
        ids = tf.where(ok[:, None], ids, pad)
        return {"captions": captions, "token_ids": ids, "scores": tf.where(ok, scores, 0.0), "ok": ok}


def export_saved_model(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    seed: int = 0,
    **generation: Any,
) -> dict[str, Any]:
    """Write the SavedModel of a trained run; returns export time and size."""
    start = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model = Captioner.load(run_dir)
    tokenizer = GPT2Tokenizer.for_run(run_dir, model.decoder.num_special_tokens)
    module = CaptionModule(model, tokenizer, batch_size=batch_size, seed=seed, **generation)
    # Keras' ExportArchive tracks the model's variables the way TF Serving's (TF1-style)
    # loader restores them; a plain tf.saved_model.save of the same function loads in
    # TF2 but not in saved_model_cli run / TF Serving.
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", module.serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    with atomic_folder(out_dir, "exists already; remove it or export elsewhere") as partial:  # a full disk: no half export
        archive.write_out(str(partial), verbose=False)
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return {"seconds": time.perf_counter() - start, "bytes": size, "path": str(out_dir)}


def example_bytes(paths: list[str | os.PathLike]) -> np.ndarray:
    """Files as the ``images`` input: an object array of their bytes."""
    return np.array([Path(p).read_bytes() for p in paths], dtype=object)
