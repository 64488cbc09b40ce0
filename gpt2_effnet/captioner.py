"""``Captioner`` = ``ImageEncoder`` + ``GPT2Decoder`` with cross-attention in every block."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .config import CaptionerConfig, ConfigError
from .encoder import ImageEncoder
from .gpt2 import GPT2Decoder

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "captioner.weights.h5"


@keras.saving.register_keras_serializable("gpt2_effnet")
class Captioner(keras.Model):
    """``{"images": [B,S,S,3], "token_ids": [B,T]}`` -> next-token logits ``[B, T, V]``.

    Build with :meth:`from_yaml` / :meth:`create` to also load pretrained GPT-2 weights
    and apply the config's freezing; the plain constructor gives random weights.
    """

    def __init__(self, captioner_config: CaptionerConfig | dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(captioner_config, dict):
            captioner_config = CaptionerConfig.from_dict(captioner_config)
        self.captioner_config = cfg = captioner_config
        policy = self.dtype_policy
        self.encoder = ImageEncoder(
            backbone=cfg.model.backbone,
            image_size=cfg.model.image_size,
            width=cfg.gpt2.n_embd,
            num_layers=cfg.model.encoder_layers,
            num_heads=cfg.model.encoder_heads,
            backbone_weights=cfg.model.backbone_weights,
            epsilon=cfg.gpt2.layer_norm_epsilon,
            dropout=cfg.model.dropout,
            bn_momentum=cfg.model.backbone_bn_momentum,
            feature_stride=cfg.model.feature_stride,
            drop_path=cfg.model.backbone_drop_path,
            name="encoder",
            dtype=policy,
        )
        self.decoder = GPT2Decoder(
            cfg.gpt2,
            num_special_tokens=cfg.model.num_special_tokens,
            cross_attention=cfg.model.cross_attention,
            dropout=cfg.model.dropout,
            output_vocabulary=cfg.model.output_vocabulary if isinstance(cfg.model.output_vocabulary, list) else None,
            name="decoder",
            dtype=policy,
        )
        self.apply_trainable()
        self.built = True
        # Where load() read the model from: caption() finds the run's tokenizer there.
        self.source: Path | None = None
        self._tokenizer: Any = None

    # -- construction --------------------------------------------------------------------
    @classmethod
    def create(cls, config: CaptionerConfig | str | os.PathLike, gpt2: str | os.PathLike | None = None) -> "Captioner":
        """From a config (or YAML path); ``gpt2`` names a folder/file of pretrained GPT-2 weights."""
        if not isinstance(config, CaptionerConfig):
            config = CaptionerConfig.load(config)
        model = cls(config)
        if gpt2 is not None:
            model.load_gpt2_weights(gpt2)
        return model

    from_yaml = create

    def load_gpt2_weights(self, path: str | os.PathLike, strict: bool = True) -> Any:
        """Load pretrained GPT-2 into the decoder; cross-attention keeps its initial values."""
        from .weights import load_into

        return load_into(self.decoder, path, strict=strict)

    def apply_trainable(self) -> None:
        """Freeze what the config says; cross-attention, the encoder head and special tokens always train."""
        train = self.captioner_config.trainable
        self.encoder.backbone.trainable = train.backbone
        self.decoder.wte.trainable = train.gpt2_embeddings
        self.decoder.wpe.trainable = train.gpt2_embeddings
        pretrained_parts = [self.decoder.ln_f]
        for block in self.decoder.blocks:
            pretrained_parts += [block.ln_1, block.attn, block.ln_2, block.c_fc, block.c_proj]
        for layer in pretrained_parts:
            layer.trainable = train.gpt2_blocks

    # -- forward -------------------------------------------------------------------------
    def encode_images(self, images: Any, training: bool | None = None, backbone_precision: str = "float32") -> Any:
        """Images -> every block's cross-attention K/V, computed once and reused while decoding.
        ``backbone_precision``: see :meth:`ImageEncoder.call <gpt2_effnet.encoder.ImageEncoder.call>`."""
        return self.decoder.project_image(self.encoder(images, training=training, backbone_precision=backbone_precision))

    def call(self, inputs: dict[str, Any], training: bool | None = None) -> Any:
        return self.decoder.head(self.hidden_states(inputs, training=training))

    def hidden_states(self, inputs: dict[str, Any], training: bool | None = None) -> Any:
        """The decoder's last hidden states ``[B, T, W]``; ``decoder.head`` turns them into logits."""
        image_kv = self.encode_images(inputs["images"], training=training)
        return self.decoder.hidden_states(inputs["token_ids"], image_kv=image_kv, training=training)

    def attention_maps(self, images: Any, caption_ids: Any) -> np.ndarray:
        """Where each caption token looked: ``[B, n_layer, T, h, w]`` float32, mean over heads.

        ``caption_ids [B, T]`` are generated tokens (BOS not included, as
        :meth:`generate` returns them); entry ``t`` is the cross-attention over the image
        grid at the step that produced token ``t``. One extra forward pass, after decoding.
        """
        caption_ids = np.asarray(keras.ops.convert_to_numpy(caption_ids), np.int32)
        bos = np.full((caption_ids.shape[0], 1), self.decoder.gpt2_config.vocab_size, np.int32)
        inputs = np.concatenate([bos, caption_ids[:, :-1]], axis=1)
        image_kv = self.encode_images(images, training=False)
        weights = keras.ops.convert_to_numpy(self.decoder.cross_attention_weights(inputs, image_kv))
        height, width = self.encoder.grid
        batch, layers, _, steps, _ = weights.shape
        return weights.mean(axis=2).reshape(batch, layers, steps, height, width).astype(np.float32)

    # -- generation ------------------------------------------------------------------------
    def generate(self, images: Any, **kwargs: Any) -> Any:
        """Caption token ids ``[B, new]`` (BOS not included); keywords as HF ``generate()``."""
        from .decoding import generate_captions

        return generate_captions(self, images, **kwargs)

    def caption(self, images: Any, *, tokenizer: Any = None, batch_size: int = 16, **generate_kwargs: Any) -> list[str]:
        """Captions of ``images`` as text, one per image (``num_return_sequences`` per image, in order).

        ``images``: a path, encoded bytes, a Pillow image, an array (``[H, W, C]`` or a batch
        ``[N, H, W, C]``; uint8, or numbers in 0..255) or a list of these, read and resized
        as ``gpt2-effnet caption`` reads files (:func:`~gpt2_effnet.image_input.to_pixels`).
        Keywords are :func:`~gpt2_effnet.decoding.generate`'s (``num_beams``, ``top_p``,
        ``seed``, ...); ``batch_size`` images decode together, batched as the command
        batches, so the same files and settings give the command's captions. The tokenizer
        is the run's (``RUN/tokenizer``, else GPT-2's) for a model :meth:`load` read, GPT-2's
        for one built in memory with GPT-2's vocabulary; pass ``tokenizer`` otherwise.
        """
        from .decoding import caption_strings
        from .image_input import fill_batch, split_images, to_pixels

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tokenizer = self._default_tokenizer() if tokenizer is None else tokenizer
        size, limit = self.captioner_config.model.image_size, self.captioner_config.train.max_image_pixels
        repeats = generate_kwargs.get("num_return_sequences", 1)
        items = split_images(images)
        captions: list[str] = []
        for start in range(0, len(items), batch_size):
            pixels = np.stack([to_pixels(item, size, limit) for item in items[start : start + batch_size]])
            batch = fill_batch(pixels, batch_size, len(items))
            captions += caption_strings(self, batch, tokenizer=tokenizer, **generate_kwargs)[: len(pixels) * repeats]
        return captions

    def _default_tokenizer(self) -> Any:
        from .tokenizer import GPT2Tokenizer

        if self._tokenizer is None:
            specials, vocab = self.decoder.num_special_tokens, self.decoder.gpt2_config.vocab_size
            if self.source is not None:
                tokenizer = GPT2Tokenizer.for_run(self.source, specials)
            else:
                tokenizer = GPT2Tokenizer.default(specials)
                if tokenizer.vocab_size != vocab:
                    raise ValueError(f"this captioner's vocabulary has {vocab} tokens, not GPT-2's "
                                     f"{tokenizer.vocab_size}: pass caption(..., tokenizer=...)")
            self._tokenizer = tokenizer
        return self._tokenizer

    # -- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.yaml`` + ``captioner.weights.h5``: a folder :meth:`load` reads back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.captioner_config.save(directory / CONFIG_FILE)
        self.save_weights(directory / WEIGHTS_FILE)
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Captioner":
        """Read a ``.keras`` file, or a folder written by :meth:`save_pretrained` / training."""
        path = Path(path)
        if path.suffix == ".keras":
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
            if not zipfile.is_zipfile(path):  # Keras would say "File not found" about a file that is there
                raise ValueError(f"{path}: not a Keras archive (a .keras file is a zip written by model.save)")
            model = keras.saving.load_model(path)
            if not isinstance(model, cls):
                raise ValueError(f"{path} holds a {type(model).__name__}, not a Captioner")
            model.source = path
            return model
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path}: expected a .keras file or a folder with {CONFIG_FILE}")
        config = CaptionerConfig.load(path / CONFIG_FILE)
        config = config.replace(model={"backbone_weights": None})
        model = cls(config)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} next to {CONFIG_FILE}")
        try:
            model.load_weights(weights)
        except (OSError, ValueError) as err:  # h5py's messages do not name the file
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise (OSError if isinstance(err, OSError) else ValueError)(f"{weights}: {first}") from None
        model.source = path
        return model

    def get_config(self) -> dict[str, Any]:
        config = self.captioner_config.replace(model={"backbone_weights": None})
        return {**super().get_config(), "captioner_config": config.to_dict()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Captioner":
        config = dict(config)
        captioner_config = config.pop("captioner_config")
        for key in ("name", "trainable", "dtype"):
            config.pop(key, None)
        try:
            return cls(CaptionerConfig.from_dict(captioner_config))
        except ConfigError as err:
            raise ValueError(f"saved captioner config is invalid: {err}") from None
