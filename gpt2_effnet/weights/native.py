"""Our own format: a folder with ``config.json`` (HF keys) and ``gpt2.weights.h5``.

The weights file is what Keras 3 ``GPT2Decoder.save_weights`` writes. Keras itself loads
such a file leniently (a file with fewer blocks than the model loads without a word), so
we read it with h5py instead: every variable group carries its layer's name, and the
path of layer names (``h_0/attn/c_attn``) plus the variable's index (Dense: 0 kernel,
1 bias; LayerNormalization: 0 gamma, 1 beta; Embedding: 0 table) maps explicitly to the
canonical names, so this format gets the same strict by-name check as the others.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import GPT2Config
from .common import WeightLoadError, WeightReader, inverse_block_table, split_block_name, translate

if TYPE_CHECKING:
    from ..gpt2 import GPT2Decoder

WEIGHTS_FILE = "gpt2.weights.h5"
CONFIG_FILE = "config.json"

# "<layer-name path>/<variable index>" -> canonical name.
GLOBAL_TABLE: dict[str, str] = {
    "wte/0": "wte.weight",
    "wpe/0": "wpe.weight",
    "ln_f/0": "ln_f.weight",
    "ln_f/1": "ln_f.bias",
}
BLOCK_PATTERN = re.compile(r"^h_(\d+)/(.+)$")
BLOCK_TABLE: dict[str, str] = {
    "ln_1/0": "ln_1.weight",
    "ln_1/1": "ln_1.bias",
    "attn/c_attn/0": "attn.c_attn.weight",
    "attn/c_attn/1": "attn.c_attn.bias",
    "attn/c_proj/0": "attn.c_proj.weight",
    "attn/c_proj/1": "attn.c_proj.bias",
    "ln_2/0": "ln_2.weight",
    "ln_2/1": "ln_2.bias",
    "c_fc/0": "mlp.c_fc.weight",
    "c_fc/1": "mlp.c_fc.bias",
    "c_proj/0": "mlp.c_proj.weight",
    "c_proj/1": "mlp.c_proj.bias",
}
_BLOCK_INVERSE = inverse_block_table(BLOCK_TABLE)


class NativeReader(WeightReader):
    format = "native"

    def __init__(self, path: Path, config: GPT2Config | None) -> None:
        super().__init__(path, config)
        import h5py

        self._file = h5py.File(path, "r")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._layer_key: dict[str, str] = {}
        unnamed: list[str] = []

        def visit(name: str, obj: object) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            self._shapes[name] = tuple(int(d) for d in obj.shape)
            parts = name.split("/")
            if len(parts) < 2 or parts[-2] != "vars":
                unnamed.append(name)
                return
            # Walk the groups from just below the root down to the variable's owner;
            # the root's own name (the model's name) is not part of the key.
            names = []
            for depth in range(1, len(parts) - 1):
                group = self._file["/".join(parts[:depth])]
                layer_vars = group.get("vars")
                if isinstance(layer_vars, h5py.Group) and "name" in layer_vars.attrs:
                    label = layer_vars.attrs["name"]
                    names.append(label.decode() if isinstance(label, bytes) else str(label))
            self._layer_key[name] = "/".join(names + [parts[-1]])

        try:
            self._file.visititems(visit)
        except Exception:
            self.close()
            raise
        if unnamed:
            self.close()
            raise WeightLoadError(
                f"{path}: not a Keras 3 weights file (datasets outside a 'vars' group: {unnamed[:5]})"
            )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._file[name])

    def to_canonical(self, name: str) -> str | None:
        key = self._layer_key.get(name)
        return None if key is None else translate(key, BLOCK_PATTERN, GLOBAL_TABLE, BLOCK_TABLE)

    def file_name(self, canonical: str) -> str:
        layer, suffix = split_block_name(canonical)
        if layer is None:
            key = next(k for k, v in GLOBAL_TABLE.items() if v == canonical)
        else:
            key = f"h_{layer}/{_BLOCK_INVERSE[suffix]}"
        return f"variable {key} (layer path/variable index)"

    def close(self) -> None:
        try:
            self._file.close()
        except Exception:  # already closed
            pass


def save_native(decoder: "GPT2Decoder", out_dir: Path) -> Path:
    """Write ``config.json`` + ``gpt2.weights.h5`` for a plain GPT-2 decoder."""
    if decoder.num_special_tokens or decoder.cross_attention is not None:
        raise ValueError(
            "the native GPT-2 format holds a plain GPT-2 only; this decoder has "
            f"{decoder.num_special_tokens} special tokens and cross_attention={decoder.cross_attention!r}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(decoder.gpt2_config.to_hf_dict(), indent=2) + "\n")
    path = out_dir / WEIGHTS_FILE
    decoder.save_weights(str(path))
    return path
