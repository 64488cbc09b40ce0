"""Hugging Face ``tf_model.h5`` (Keras-2 HDF5 weights of ``TFGPT2LMHeadModel``).

Datasets sit at paths like ``transformer/tfgp_t2lm_head_model/transformer/h_._0/attn/c_attn/weight:0``.
The model-name group in the middle changed between transformers versions, so names are
matched on the part below the last ``transformer`` path component. Conv1D biases are
stored ``[1, nf]``; the token embedding is ``wte/weight:0`` (TFSharedEmbeddings, older
versions) or ``wte/embeddings:0`` (a Keras Embedding, newer versions).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..config import GPT2Config
from .common import WeightReader, drop_leading_one, hf_config_problems, inverse_block_table, split_block_name, translate

ANCHOR = "transformer"

# Path below the last "transformer/" component -> canonical name.
GLOBAL_TABLE: dict[str, str] = {
    "wte/weight:0": "wte.weight",
    "wte/embeddings:0": "wte.weight",
    "wpe/embeddings:0": "wpe.weight",
    "ln_f/gamma:0": "ln_f.weight",
    "ln_f/beta:0": "ln_f.bias",
}
BLOCK_PATTERN = re.compile(r"^h_\._(\d+)/(.+)$")
BLOCK_TABLE: dict[str, str] = {
    "ln_1/gamma:0": "ln_1.weight",
    "ln_1/beta:0": "ln_1.bias",
    "attn/c_attn/weight:0": "attn.c_attn.weight",
    "attn/c_attn/bias:0": "attn.c_attn.bias",
    "attn/c_proj/weight:0": "attn.c_proj.weight",
    "attn/c_proj/bias:0": "attn.c_proj.bias",
    "ln_2/gamma:0": "ln_2.weight",
    "ln_2/beta:0": "ln_2.bias",
    "mlp/c_fc/weight:0": "mlp.c_fc.weight",
    "mlp/c_fc/bias:0": "mlp.c_fc.bias",
    "mlp/c_proj/weight:0": "mlp.c_proj.weight",
    "mlp/c_proj/bias:0": "mlp.c_proj.bias",
}
_BLOCK_INVERSE = inverse_block_table(BLOCK_TABLE)
# TFConv1D biases are [1, nf].
_UNIT_AXIS_SUFFIXES = ("attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")
# A full-model save (model.save, not save_weights) also stores the optimizer's state.
_IGNORED_TOP_GROUPS = ("optimizer_weights",)


def _below_anchor(path: str) -> str | None:
    parts = path.split("/")
    positions = [i for i, part in enumerate(parts) if part == ANCHOR]
    if not positions:
        return None
    return "/".join(parts[positions[-1] + 1 :])


def _has_unit_axis(canonical: str) -> bool:
    return split_block_name(canonical)[1] in _UNIT_AXIS_SUFFIXES


class HFH5Reader(WeightReader):
    format = "hf_h5"

    def __init__(self, path: Path, config: GPT2Config | None, config_file: Path | None = None) -> None:
        super().__init__(path, config)
        import h5py

        self._file = h5py.File(path, "r")
        self._shapes: dict[str, tuple[int, ...]] = {}

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                self._shapes[name] = tuple(int(d) for d in obj.shape)

        self._file.visititems(visit)
        if config_file is not None and config_file.is_file():
            self.config_problems = hf_config_problems(config_file)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._file[name])

    def to_canonical(self, name: str) -> str | None:
        below = _below_anchor(name)
        if below is None:
            return None
        return translate(below, BLOCK_PATTERN, GLOBAL_TABLE, BLOCK_TABLE)

    def file_name(self, canonical: str) -> str:
        layer, suffix = split_block_name(canonical)
        if canonical == "wte.weight":
            return ".../transformer/wte/weight:0 or .../transformer/wte/embeddings:0"
        if layer is None:
            below = next(k for k, v in GLOBAL_TABLE.items() if v == canonical)
        else:
            below = f"h_._{layer}/{_BLOCK_INVERSE[suffix]}"
        return f".../transformer/{below}"

    def is_ignored(self, name: str) -> bool:
        return name.split("/", 1)[0] in _IGNORED_TOP_GROUPS

    def canonical_shape(self, canonical: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return drop_leading_one(shape) if _has_unit_axis(canonical) else shape

    def canonical_array(self, canonical: str, array: np.ndarray) -> np.ndarray:
        return array.reshape(self.canonical_shape(canonical, array.shape)) if _has_unit_axis(canonical) else array

    def close(self) -> None:
        try:
            self._file.close()
        except Exception:  # already closed
            pass
