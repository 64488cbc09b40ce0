"""DALI decodes the shard pipeline's images: on the GPU (``device="mixed"``) when there is one.

The bytes come from the same reader as the tf.data loader (:mod:`.shard_reader`), so both
loaders read the same samples at the same positions from any store, resume exactly, and
count the same problems; DALI gets each encoded image through an external source
(``DALIDatasetWithInputs``) and does the costly part: decode and antialiased resize, to
uint8. One pipeline per replica, each on that replica's GPU (``device_id``); its uint8
batch crosses to the host once for tokenising in tf.data, then to its replica's device.

DALI's own webdataset reader is not used: it reads local files and S3 only, and through
the TensorFlow plugin its position cannot be saved, so a resumed run could not start where
it stopped. A header check in Python keeps images over the pixel limit, formats DALI
cannot decode and broken headers away from its decoder (which would stop the pipeline):
they are swapped for a tiny stand-in and their rows masked. An image whose header is fine
but whose body is corrupt can still stop DALI; use ``--loader tfdata`` for such shards.
"""

from __future__ import annotations

import io
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from .pipeline import PipelineSpec, SkipCounter, Tokenizer, batch_dict, decode_parallelism, pipeline_options, text_tokenizer_fn
from .shard_reader import IMAGE_EXTS
from .wds import ShardsArg, epoch_order, sample_stream, shard_set

DALI_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")  # the rest (GIF) is decoded by Pillow and handed over as PNG


def dali_available() -> bool:
    """True when both DALI and its TensorFlow plugin import (the plugin is built per TF version)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.tf  # noqa: F401
    except Exception:
        return False
    return True


def _gpu_present() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _stand_in_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def dali_input(image: bytes | None, name: str, image_size: int, max_pixels: int | None, skips: SkipCounter) -> tuple[bytes | None, str | None]:
    """(bytes DALI can decode, or None; the problem) for one sample, from its header only."""
    from PIL import Image

    from ..image_input import decode_rgb, jpeg_size

    if image is None:
        return None, "no image"
    size_from_header = jpeg_size(image)
    if size_from_header is not None:  # the common case, checked without Pillow
        width, height = size_from_header
        if max_pixels is not None and width * height > max_pixels:
            return None, "over the pixel limit"
        return image, None
    try:
        with Image.open(io.BytesIO(image)) as probe:
            width, height = probe.size
            kind = probe.format
    except Image.DecompressionBombError:
        return None, "over the pixel limit"
    except Exception as err:  # not an image at all
        return None, f"{type(err).__name__}"
    if max_pixels is not None and width * height > max_pixels:
        return None, "over the pixel limit"
    if kind in DALI_FORMATS:
        return image, None
    try:  # a format DALI does not read: Pillow decodes it, DALI gets lossless PNG at the final size
        buffer = io.BytesIO()
        Image.fromarray(decode_rgb(image, image_size, max_pixels)).save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue(), None
    except Exception as err:  # noqa: BLE001 - counted as unreadable by the caller
        return None, f"{type(err).__name__}"


class _Tee:
    """Several consumers of one iterator, each getting every item (DALI's input and the side data)."""

    def __init__(self, source: Iterator, consumers: int) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._queues = [deque() for _ in range(consumers)]
        self._done = False

    def consumer(self, index: int, pick: Callable) -> Callable[[], Iterator]:
        def generate() -> Iterator:
            own = self._queues[index]
            while True:
                with self._lock:
                    if not own:
                        if self._done:
                            return
                        try:
                            item = next(self._source)
                        except StopIteration:
                            self._done = True
                            return
                        for q in self._queues:
                            q.append(item)
                    item = own.popleft()
                yield pick(item)

        return generate


def dali_dataset(
    shards: ShardsArg,
    tokenizer: Tokenizer,
    spec: PipelineSpec,
    skips: SkipCounter | None = None,
    image_exts: Sequence[str] = IMAGE_EXTS,
    device: str = "auto",
    device_id: int = 0,
    num_threads: int | None = None,
) -> "tf.data.Dataset":  # noqa: F821
    """Batches of {"images", "token_ids", "mask"} from webdataset shards, decoded by DALI.

    device: "auto" (GPU decode when TensorFlow sees a GPU), "gpu" or "cpu". The batches are
    those of :func:`~gpt2_effnet.data.wds.wds_dataset`, pixels aside (DALI's resampler).
    DALI yields whole batches only: without ``drop_remainder`` the last one is filled up
    with masked rows.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.plugin.tf as dali_tf
    import nvidia.dali.types as types
    import tensorflow as tf
    from nvidia.dali import pipeline_def

    if device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
    use_gpu = _gpu_present() if device == "auto" else device == "gpu"
    shards = shard_set(shards)
    order = epoch_order(shards, spec)
    if order.length == 0:
        raise ValueError(f"pipeline {spec.shard_index} of {spec.num_shards} gets no samples: only {shards.total} in the shards")
    skips = skips if skips is not None else SkipCounter()
    skips.bind(order.length or 0)
    batch_size, size, limit = spec.batch_size, spec.image_size, spec.max_image_pixels
    stand_in = np.frombuffer(_stand_in_jpeg(), np.uint8)

    def samples() -> Iterator[tuple[np.ndarray, bytes, int]]:
        count = 0
        for sample in sample_stream(shards, spec, skips, tuple(image_exts)):
            count += 1
            if sample.problem is not None:
                yield stand_in, b"", 0
                continue
            data, problem = dali_input(sample.image, sample.name, size, limit, skips)
            if data is None:
                skips.add_unreadable(sample.name)
                yield stand_in, b"", 0
                continue
            skips.add_decoded()
            yield np.frombuffer(data, np.uint8), sample.text or b"", 1
        if not spec.drop_remainder:
            for _ in range((-count) % batch_size):  # DALI takes whole batches only: fill the last one
                yield stand_in, b"", 0

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Whole batches: the encoded images zero-padded to one length (decoders stop at the
        image's own end marker), so DALI takes one dense tensor per batch instead of one
        tensor per sample (fewer hand-overs between TensorFlow and DALI per image)."""
        stream = samples()
        while True:
            chunk = list(itertools.islice(stream, batch_size))
            if len(chunk) < batch_size:
                return
            padded = np.zeros((batch_size, max(len(c[0]) for c in chunk)), np.uint8)
            for row, (encoded, _, _) in enumerate(chunk):
                padded[row, : len(encoded)] = encoded
            yield padded, np.array([c[1] for c in chunk], dtype=object), np.array([c[2] for c in chunk], np.int32)

    tee = _Tee(batches(), 2)
    encoded = tf.data.Dataset.from_generator(tee.consumer(0, lambda item: item[0]),
                                             output_signature=tf.TensorSpec([batch_size, None], tf.uint8)).prefetch(2)
    side = tf.data.Dataset.from_generator(tee.consumer(1, lambda item: item[1:]),
                                          output_signature=(tf.TensorSpec([batch_size], tf.string),
                                                            tf.TensorSpec([batch_size], tf.int32)))

    @pipeline_def(batch_size=batch_size, num_threads=num_threads or decode_parallelism(spec),
                  device_id=device_id if use_gpu else None, prefetch_queue_depth=2)
    def pipeline():
        jpegs = fn.external_source(name="encoded", dtype=types.UINT8)
        images = fn.decoders.image(jpegs, device="mixed" if use_gpu else "cpu", output_type=types.RGB)
        return fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                         antialias=True, dtype=types.UINT8)

    # On the CPU so tokenising can follow in tf.data; with GPU decode DALI copies each uint8
    # batch to host memory once (a quarter of float32's bytes).
    with tf.device("/cpu:0"):
        images = dali_tf.experimental.DALIDatasetWithInputs(
            pipeline=pipeline(), input_datasets={"encoded": dali_tf.experimental.Input(encoded, batch=True)},
            batch_size=batch_size,
            output_shapes=((batch_size, size, size, 3),), output_dtypes=(tf.uint8,),
            device_id=device_id if use_gpu else None, fail_on_device_mismatch=False,
        )
    ds = tf.data.Dataset.zip((images, side))
    tokenize = text_tokenizer_fn(tokenizer, spec.max_length)

    def to_dict(decoded: tuple[tf.Tensor], texts_ok: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        texts, ok = texts_ok
        token_ids, mask = tokenize(texts)
        return batch_dict(decoded[0] if isinstance(decoded, tuple) else decoded, token_ids, mask, ok)

    ds = ds.map(to_dict).prefetch(2)
    return ds.with_options(pipeline_options(deterministic=True))
