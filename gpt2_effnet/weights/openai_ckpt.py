"""OpenAI's released GPT-2 TensorFlow checkpoints (``model.ckpt.*`` + ``hparams.json``).

Names are ``model/wte``, ``model/wpe``, ``model/ln_f/{g,b}`` and per block
``model/h{i}/{ln_1,attn/c_attn,attn/c_proj,ln_2,mlp/c_fc,mlp/c_proj}/{g,b,w}``; the
projection kernels ``w`` are 1x1 convolutions stored ``[1, nx, nf]``. Read with
``tf.train.load_checkpoint`` (tensor-bundle protobuf and raw data; nothing unpickled).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..config import GPT2Config
from .common import WeightReader, drop_leading_one, inverse_block_table, split_block_name, translate

GLOBAL_TABLE: dict[str, str] = {
    "model/wte": "wte.weight",
    "model/wpe": "wpe.weight",
    "model/ln_f/g": "ln_f.weight",
    "model/ln_f/b": "ln_f.bias",
}
BLOCK_PATTERN = re.compile(r"^model/h(\d+)/(.+)$")
BLOCK_TABLE: dict[str, str] = {
    "ln_1/g": "ln_1.weight",
    "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight",
    "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight",
    "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight",
    "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight",
    "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight",
    "mlp/c_proj/b": "mlp.c_proj.bias",
}
_BLOCK_INVERSE = inverse_block_table(BLOCK_TABLE)
_UNIT_AXIS_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Fine-tuned checkpoints (e.g. from OpenAI's training code or gpt-2-simple) also hold
# the step counter and Adam's slots; they are state, not weights.
_IGNORED_NAMES = ("global_step", "beta1_power", "beta2_power", "_CHECKPOINTABLE_OBJECT_GRAPH")
_IGNORED_SUFFIXES = ("/Adam", "/Adam_1")

_CHECKPOINT_LINE = re.compile(r'^model_checkpoint_path:\s*"(.*)"\s*$', re.MULTILINE)


def find_checkpoint_prefix(folder: Path) -> Path | None:
    """The checkpoint prefix in a folder: from its ``checkpoint`` file, else ``model.ckpt``.

    The ``checkpoint`` file may hold an absolute path from the machine that wrote it, so
    a path that does not exist is retried relative to this folder.
    """
    folder = Path(folder)
    state = folder / "checkpoint"
    if state.is_file():
        match = _CHECKPOINT_LINE.search(state.read_text(errors="replace"))
        if match:
            recorded = Path(match.group(1))
            for candidate in (recorded if recorded.is_absolute() else folder / recorded, folder / recorded.name):
                if Path(f"{candidate}.index").is_file():
                    return candidate
    if (folder / "model.ckpt.index").is_file():
        return folder / "model.ckpt"
    return None


def _has_unit_axis(canonical: str) -> bool:
    return split_block_name(canonical)[1] in _UNIT_AXIS_SUFFIXES


class OpenAICheckpointReader(WeightReader):
    format = "openai_ckpt"

    def __init__(self, prefix: Path, config: GPT2Config | None) -> None:
        super().__init__(prefix, config)
        import tensorflow as tf

        self._reader = tf.train.load_checkpoint(str(prefix))
        self._shapes = {
            name: tuple(int(d) for d in shape) for name, shape in self._reader.get_variable_to_shape_map().items()
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._reader.get_tensor(name))

    def to_canonical(self, name: str) -> str | None:
        return translate(name, BLOCK_PATTERN, GLOBAL_TABLE, BLOCK_TABLE)

    def file_name(self, canonical: str) -> str:
        layer, suffix = split_block_name(canonical)
        if layer is None:
            return next(k for k, v in GLOBAL_TABLE.items() if v == canonical)
        return f"model/h{layer}/{_BLOCK_INVERSE[suffix]}"

    def is_ignored(self, name: str) -> bool:
        return name in _IGNORED_NAMES or name.endswith(_IGNORED_SUFFIXES)

    def canonical_shape(self, canonical: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return drop_leading_one(shape) if _has_unit_axis(canonical) else shape

    def canonical_array(self, canonical: str, array: np.ndarray) -> np.ndarray:
        return array.reshape(self.canonical_shape(canonical, array.shape)) if _has_unit_axis(canonical) else array
