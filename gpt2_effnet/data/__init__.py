"""Data: caption files, image decoding, tf.data and DALI pipelines, shards, the synthetic set.

Every pipeline yields the same batch dict,
``{"images": float32 [B,S,S,3] 0..255, "token_ids": int32 [B,L], "mask": int32 [B,L]}``:

- ``captions.read_csv / read_coco / read_captions`` -> ``CaptionSet`` (missing files found up front)
- ``pipeline.caption_dataset`` (CSV/COCO, tf.data) with ``pipeline.SkipCounter`` for skipped samples
- ``shards.write_shards`` (webdataset tars in img2dataset layout + DALI index files)
- ``wds.wds_dataset`` (pure tf.data shard reader) and ``dali.dali_dataset`` (DALI, same samples)
- ``synthetic.write_synthetic`` (procedural captioned shapes for tests and the demo)

Submodules are imported on demand so that ``import gpt2_effnet.data`` stays free of TensorFlow.
"""
