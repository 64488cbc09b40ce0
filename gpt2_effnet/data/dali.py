"""DALI pipeline over webdataset shards, handed to TensorFlow through the DALI TF plugin.

DALI reads the tars (`fn.readers.webdataset`), shuffles, decodes (on the GPU with
device="mixed" when TensorFlow sees one, on the CPU otherwise) and resizes. Captions leave DALI
as raw, NUL-padded UTF-8 bytes and are tokenised once per *batch* in TensorFlow: at ~5-10 us
per caption that is a small fraction of a decode (bench/bench_data.py measures both), and it
works on img2dataset shards from the wild, which hold only jpg/txt/json.

Sharding matches the tf.data reader (gpt2_effnet.data.wds) sample for sample: both drop
samples lacking a component, then give worker i of k the slice [n*i//k, n*(i+1)//k).
`stick_to_shard` keeps each worker on its own slice every epoch.

DALI's decoder stops on an undecodable image; shards written by `gpt2-effnet shards` were
fully decoded once while writing, so this only concerns foreign shards (use the tf.data
reader, which skips and counts bad images, for those that fail).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from gpt2_effnet.data.pipeline import PipelineSpec, SkipCounter, Tokenizer, pipeline_options, text_tokenizer_fn
from gpt2_effnet.data.shards import IMAGE_EXTS, index_path_for
from gpt2_effnet.data.wds import plan_shards


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
    """An 8 x 8 grey JPEG: what an image over the pixel limit is decoded as before it is dropped."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


def dali_dataset(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    spec: PipelineSpec,
    skips: SkipCounter | None = None,
    image_exts: Sequence[str] = IMAGE_EXTS,
    device: str = "auto",
    device_id: int = 0,
    num_threads: int | None = None,
) -> "tf.data.Dataset":  # noqa: F821
    """Batches of {"images", "token_ids", "mask"} from webdataset shards, read and decoded by DALI.

    device: "auto" (GPU decode when TensorFlow sees a GPU), "gpu" or "cpu". With
    `spec.repeat` the stream is endless and epochs run into each other inside batches.
    Without it, one epoch is yielded: ceil(n / batch_size) batches, the last one trimmed to
    the real samples (or n // batch_size full batches with `drop_remainder`). `skips.missing`
    counts samples lacking an image or a caption, which DALI drops. DALI's output order is
    fixed by its seed whatever `spec.deterministic` says.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.plugin.tf as dali_tf
    import nvidia.dali.types as types
    import tensorflow as tf
    from nvidia.dali import pipeline_def

    if device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', got {device!r}")
    use_gpu = _gpu_present() if device == "auto" else device == "gpu"
    plan = plan_shards(shards, spec.num_shards, spec.shard_index, image_exts)
    n = plan.num_samples
    if n == 0:
        raise ValueError(f"worker {spec.shard_index} of {spec.num_shards} gets no samples: only {plan.stop} in the shards")
    skips = skips if skips is not None else SkipCounter()
    skips.bind(n, plan.incomplete)

    paths = list(plan.paths)
    indexes = [str(index_path_for(p)) for p in paths]
    if not all(os.path.isfile(i) for i in indexes):
        indexes = []  # DALI then scans the tars itself (slower start)
    pipe_seed = -1 if spec.seed is None else int(spec.seed)
    batch_size, image_size, repeat = spec.batch_size, spec.image_size, spec.repeat

    limit = spec.max_image_pixels
    # An image whose header announces more than the limit is swapped for a tiny stand-in
    # before the decoder sees it (DALI cannot drop a sample mid-pipeline), flagged, and
    # dropped and counted on the TensorFlow side.
    stand_in = np.frombuffer(_stand_in_jpeg(), np.uint8)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads or os.cpu_count() or 1,
                  device_id=device_id if use_gpu else None, seed=pipe_seed, prefetch_queue_depth=2,
                  enable_conditionals=limit is not None)
    def pipeline():
        jpegs, texts = fn.readers.webdataset(
            paths=paths,
            index_paths=indexes,
            ext=[";".join(image_exts), "txt"],
            missing_component_behavior="skip",
            random_shuffle=spec.shuffle,
            initial_fill=spec.shuffle_buffer,
            shard_id=spec.shard_index,
            num_shards=spec.num_shards,
            stick_to_shard=True,
            pad_last_batch=not repeat,
            name="reader",
        )
        if limit is not None:
            shape = fn.peek_image_shape(jpegs)
            too_big = fn.cast(shape[0], dtype=types.INT64) * fn.cast(shape[1], dtype=types.INT64) > limit
            if too_big:
                jpegs = fn.cast(types.Constant(stand_in), dtype=types.UINT8)
            else:
                jpegs = jpegs
        images = fn.decoders.image(jpegs, device="mixed" if use_gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size,
                           interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
        # Variable-length bytes are padded to the longest caption of the batch for TensorFlow.
        texts = fn.pad(texts, fill_value=0)
        if limit is not None:
            return images, texts, too_big
        return images, texts

    pipe = pipeline()
    shapes = ((batch_size, image_size, image_size, 3), (batch_size, None))
    dtypes = (tf.float32, tf.uint8)
    if limit is not None:
        shapes, dtypes = shapes + ((batch_size,),), dtypes + (tf.bool,)
    # The dataset lives on the CPU so the tokeniser can follow it in tf.data; with GPU decode
    # DALI copies the finished batch to host memory once.
    with tf.device("/cpu:0"):
        ds = dali_tf.DALIDataset(pipeline=pipe, batch_size=batch_size, output_shapes=shapes, output_dtypes=dtypes,
                                 device_id=device_id if use_gpu else None, fail_on_device_mismatch=False)

    if not repeat:
        steps = n // batch_size if spec.drop_remainder else math.ceil(n / batch_size)
        last = n - (steps - 1) * batch_size  # real samples in the final batch
        ds = ds.take(steps).enumerate()

        def trim(step: tf.Tensor, *batch: tf.Tensor):
            # DALI pads the final batch by repeating the last sample; keep the real ones only.
            keep = tf.where(step == steps - 1, last, batch_size)
            return tuple(part[:keep] for part in batch)

        ds = ds.map(lambda step, batch: trim(step, *batch))
    if limit is not None:
        def count_and_drop(images: tf.Tensor, texts: tf.Tensor, too_big: tf.Tensor):
            with tf.control_dependencies([skips.add_unreadable(tf.reduce_sum(tf.cast(too_big, tf.int64)))]):
                keep = tf.logical_not(too_big)
                return tf.boolean_mask(images, keep), tf.boolean_mask(texts, keep)

        # Sequential (no parallel calls): the count is read-then-written.
        ds = ds.map(count_and_drop).unbatch().batch(batch_size, drop_remainder=spec.drop_remainder)
    tokenize = text_tokenizer_fn(tokenizer, spec.max_length)

    def to_dict(images: tf.Tensor, texts: tf.Tensor) -> dict[str, tf.Tensor]:
        token_ids, mask = tokenize(texts)
        return {"images": images, "token_ids": token_ids, "mask": mask}

    ds = ds.map(to_dict, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(pipeline_options(deterministic=True))
