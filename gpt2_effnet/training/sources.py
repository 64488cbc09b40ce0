"""Adapters from the data pipelines (``gpt2_effnet.data``) to the loop's :class:`DataSource`.

The loop asks for one epoch at a time with a shard, a per-replica batch and a seed; these
functions turn that request into a call of the right pipeline, keep the epoch's skip
counter so the loop can report it, and describe the data for the run folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import CaptionerConfig
from .data_source import DataRequest, DataSource


def make_tokenizer(config: CaptionerConfig, tokenizer_dir: str | os.PathLike | None = None) -> Any:
    """GPT-2's tokenizer (from ``tokenizer_dir`` when given, else the bundled vocabulary), checked against the model."""
    from ..tokenizer import GPT2Tokenizer

    specials = config.model.num_special_tokens
    if tokenizer_dir is not None:
        tokenizer = GPT2Tokenizer.from_pretrained(tokenizer_dir, num_special_tokens=specials)
    else:
        tokenizer = GPT2Tokenizer.default(num_special_tokens=specials)
    if tokenizer.vocab_size != config.gpt2.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the config's gpt2.vocab_size is "
            f"{config.gpt2.vocab_size}; token ids would not fit the model's embedding table"
        )
    if specials < 1:
        raise ValueError("model.num_special_tokens must be >= 1: captions start with a BOS token after the vocabulary")
    return tokenizer


class _TokenizeOnce:
    """The tokenizer with ``batch_encode`` remembered for the last few caption lists.

    The loop builds a fresh pipeline every epoch (for epoch-seeded shuffles and exact
    resume positions), and the CSV pipeline tokenises its worker's captions when built;
    the captions are the same list each epoch, so this keeps it to once per run.
    """

    def __init__(self, tokenizer: Any, keep: int = 4) -> None:
        self._tokenizer = tokenizer
        self._keep = keep
        self._cache: dict[tuple[tuple[str, ...], int, bool, bool], tuple[Any, Any]] = {}

    def batch_encode(self, texts: Sequence[str], max_length: int, add_bos: bool = True, add_eos: bool = True) -> Any:
        key = (tuple(texts), int(max_length), add_bos, add_eos)  # the strings are shared, not copied
        if key not in self._cache:
            if len(self._cache) >= self._keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._tokenizer.batch_encode(texts, max_length, add_bos=add_bos, add_eos=add_eos)
        token_ids, mask = self._cache[key]
        return token_ids.copy(), mask.copy()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


class _EpochSkips:
    """The skip counters of the epoch being read: one per input pipeline (replica), summed.

    The loop makes every pipeline of an epoch before the epoch's first step, so a request
    for an epoch (or a pipeline) already counted starts a new set.
    """

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._counters: dict[int, Any] = {}

    def fresh(self, request: DataRequest) -> Any:
        from ..data.pipeline import SkipCounter

        key = (request.epoch, request.start_batch)
        if key != self._key or request.shard_index in self._counters:
            self._key, self._counters = key, {}
        counter = self._counters[request.shard_index] = SkipCounter()
        return counter

    def count(self) -> int:
        combined = self.counter()
        return 0 if combined is None else int(combined.skipped)

    def counter(self) -> Any:
        """The live counts of the epoch being read, over its pipelines (None before the first)."""
        from ..data.pipeline import SkipCounter

        return SkipCounter.combined(list(self._counters.values())) if self._counters else None


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size and content hash of a caption file: a resume notices other data at the same path."""
    import hashlib

    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha1": digest.hexdigest()}


def pipeline_spec(config: CaptionerConfig, request: DataRequest, training: bool) -> Any:
    """What every pipeline is told for one epoch on one replica: one finite pass from ``start_batch``."""
    from ..data.pipeline import PipelineSpec

    return PipelineSpec(
        image_size=config.model.image_size,
        max_length=config.model.max_caption_length,
        batch_size=request.batch_size,
        shuffle=request.shuffle and config.train.shuffle_buffer > 0,
        seed=request.seed,
        num_shards=request.num_shards,
        shard_index=request.shard_index,
        repeat=False,
        drop_remainder=training,
        shuffle_buffer=max(config.train.shuffle_buffer, 1),
        max_image_pixels=config.train.max_image_pixels,
        start_batch=request.start_batch,
        epoch=request.epoch,
        resampled=training and config.train.resampled,
        pipelines_here=request.pipelines_here,
    )


def caption_source(
    config: CaptionerConfig,
    tokenizer: Any,
    csv: str | os.PathLike | None = None,
    coco: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    training: bool = True,
) -> DataSource:
    """A CSV (one row per caption) or COCO captions JSON plus an image folder, via tf.data."""
    from ..data.captions import read_captions
    from ..data.pipeline import ImageCache, caption_dataset

    if training and config.train.resampled:
        raise ValueError("train.resampled draws whole shards: it applies to --shards, not to a caption file")
    captions = read_captions(csv, coco, images, image_column, caption_column)
    print(captions.summary(), flush=True)
    if not captions.existing():
        from ..data.captions import CaptionFileError

        first = captions.pairs[0][0]
        raise CaptionFileError(
            f"none of the {len(captions.missing)} image file(s) that {captions.source} lists exist "
            f"(the first: {first}); check --images"
        )
    share = captions.num_missing / len(captions.pairs)
    if share > config.train.max_skip_rate:
        from ..data.captions import CaptionFileError

        # Known exactly before step 1: the loop's running check would only stop it later.
        raise CaptionFileError(
            f"{captions.num_missing} of the {len(captions.pairs)} rows of {captions.source} name image files that do "
            f"not exist ({share:.0%} > train.max_skip_rate {config.train.max_skip_rate:.0%}; e.g. "
            f"{sorted(captions.missing)[0]}); check --images, or raise the limit"
        )
    plain_tokenizer, tokenizer = tokenizer, _TokenizeOnce(tokenizer)
    skips = _EpochSkips()
    cache = ImageCache(config.train.image_cache_mb * 2**20)

    def make(request: DataRequest) -> Any:
        spec = pipeline_spec(config, request, training)
        return caption_dataset(captions, tokenizer, spec, skips=skips.fresh(request), cache=cache)

    caption_file = Path(coco if coco is not None else csv)  # type: ignore[arg-type]
    description = {
        "kind": "coco" if coco is not None else "csv",
        "file": str(caption_file.resolve()),
        "images": None if images is None else str(Path(images).resolve()),
        "pairs": len(captions.pairs),
        **file_fingerprint(caption_file),
    }
    if coco is None:
        description.update(image_column=image_column, caption_column=caption_column)

    def vocabulary() -> set[int]:
        """The token ids the captions use as targets (as the pipeline truncates them)."""
        import numpy as np

        ids, mask = tokenizer.batch_encode([text for _, text in captions.existing()], config.model.max_caption_length)
        return {int(i) for i in np.unique(ids[mask.astype(bool)])}

    return DataSource(make, num_examples=len(captions.existing()), skipped=skips.count, description=description,
                      vocabulary=vocabulary, tokenizer=plain_tokenizer, skip_counter=skips.counter)


def shard_source(
    config: CaptionerConfig,
    tokenizer: Any,
    shards: str | Sequence[str],
    loader: str = "tfdata",
    training: bool = True,
) -> DataSource:
    """Webdataset shards (local, http(s), s3, gs, ``pipe:``; patterns, lists, index files) via tf.data or DALI.

    The shard set is planned once, from per-shard counts (O(shards), no tar opened); each
    epoch's pipelines then read their own shares. With ``train.resampled`` an epoch is
    ``train.samples_per_epoch`` samples drawn shard by shard with replacement.
    """
    from ..data.locations import redact
    from ..data.shard_index import resolve

    if loader not in ("dali", "tfdata"):
        raise ValueError(f"--loader must be 'dali' or 'tfdata', got {loader!r}")
    if loader == "dali":
        from ..data.dali import dali_available

        if not dali_available():
            raise RuntimeError(
                "--loader dali: NVIDIA DALI or its TensorFlow plugin does not import here; "
                "install nvidia-dali-cuda120 (and its TF plugin) or use --loader tfdata"
            )
    shard_set = resolve(shards)
    failed, named = len(shard_set.unopenable), len(shard_set.urls) + len(shard_set.unopenable)
    if failed and (not shard_set.urls or failed / named > config.train.max_skip_rate):
        url, reason = shard_set.unopenable[0]
        raise ValueError(f"{failed} of the {named} shards could not be opened (more than train.max_skip_rate "
                         f"{config.train.max_skip_rate:.0%}; the first: {redact(url)}: {reason}); check the paths")
    if not shard_set.total:
        raise ValueError(f"the {len(shard_set.urls)} shard(s) hold no samples")
    resampled = training and config.train.resampled
    skips = _EpochSkips()

    def make(request: DataRequest) -> Any:
        spec = pipeline_spec(config, request, training)
        if loader == "dali":
            from ..data.dali import dali_dataset

            return dali_dataset(shard_set, tokenizer, spec, skips=skips.fresh(request), device_id=request.device_index)
        from ..data.wds import wds_dataset

        return wds_dataset(shard_set, tokenizer, spec, skips=skips.fresh(request))

    description = {**shard_set.describe(), "resampled": resampled}
    if shard_set.unopenable:
        description["unopenable"] = len(shard_set.unopenable)
    return DataSource(
        make,
        num_examples=config.train.samples_per_epoch if resampled else shard_set.total,
        skipped=skips.count,
        # The loader is left out: DALI and tf.data read the same samples, so a resume may switch.
        description=description,
        tokenizer=tokenizer,
        skip_counter=skips.counter,
    )
