"""Hugging Face ``model.safetensors`` (single file or sharded with ``model.safetensors.index.json``).

Two key layouts exist in the wild: ``save_pretrained`` writes ``transformer.h.0...``
(and drops the tied ``lm_head.weight``), while the hub's original ``gpt2`` files use bare
``h.0...`` names and carry the causal-mask buffers ``h.N.attn.bias`` /
``h.N.attn.masked_bias``. Both map to the canonical names by the table below.
Read with ``safetensors``' NumPy API: no PyTorch, nothing unpickled.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from ..config import GPT2Config
from .common import (
    BLOCK_PARAMS,
    GLOBAL_PARAMS,
    WeightReader,
    WeightLoadError,
    hf_config_problems,
    split_block_name,
    translate,
)

PREFIX = "transformer."
INDEX_SUFFIX = ".safetensors.index.json"
LM_HEAD = "lm_head.weight"

# File name (after the optional "transformer." prefix) -> canonical name. HF spells them alike.
GLOBAL_TABLE: dict[str, str] = {name: name for name in GLOBAL_PARAMS}
BLOCK_TABLE: dict[str, str] = {suffix: suffix for suffix in BLOCK_PARAMS}
# Non-persistent buffers that older transformers versions saved anyway: the causal mask.
_BUFFER = re.compile(r"^(?:transformer\.)?h\.\d+\.attn\.(?:bias|masked_bias)$")


def _read_bf16(file: Path, name: str) -> np.ndarray:
    """bfloat16 has no NumPy dtype; widen it to float32 exactly (it is float32's top half)."""
    with open(file, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        info = json.loads(handle.read(header_size))[name]
        start, end = info["data_offsets"]
        handle.seek(8 + header_size + start)
        raw = np.frombuffer(handle.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


class SafetensorsReader(WeightReader):
    format = "hf_safetensors"

    def __init__(self, path: Path, config: GPT2Config | None, config_file: Path | None = None) -> None:
        super().__init__(path, config)
        from safetensors import safe_open

        path = Path(path)
        if path.name.endswith(INDEX_SUFFIX):
            weight_map = json.loads(path.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightLoadError(f"{path}: no 'weight_map' in this safetensors index")
            files = sorted({path.parent / shard for shard in weight_map.values()})
        else:
            files = [path]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"safetensors file {file} not found")
        self._handles = {}
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        try:
            for file in files:
                try:
                    handle = safe_open(str(file), framework="numpy")
                except Exception as err:  # SafetensorError names no file
                    raise WeightLoadError(
                        f"{file}: not a readable safetensors file ({str(err).splitlines()[0][:160]}); "
                        "truncated by an interrupted download? Download it again"
                    ) from None
                self._handles[file] = handle
                for name in handle.keys():
                    if name in self._file_of:
                        raise WeightLoadError(f"tensor {name!r} appears in both {self._file_of[name]} and {file}")
                    tensor_slice = handle.get_slice(name)
                    self._file_of[name] = file
                    self._shapes[name] = tuple(int(d) for d in tensor_slice.get_shape())
                    self._dtypes[name] = str(tensor_slice.get_dtype())
        except Exception:
            self.close()
            raise
        has_prefix = any(name.startswith(PREFIX) for name in self._shapes)
        self.prefix = PREFIX if has_prefix else ""
        self._global = {self.prefix + k: v for k, v in GLOBAL_TABLE.items()}
        self._block = re.compile(rf"^{re.escape(self.prefix)}h\.(\d+)\.(.+)$")
        if config_file is not None and config_file.is_file():
            self.config_problems = hf_config_problems(config_file)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, name: str) -> np.ndarray:
        file = self._file_of[name]
        dtype = self._dtypes[name]
        if dtype.upper() == "BF16":
            return _read_bf16(file, name)
        try:
            return self._handles[file].get_tensor(name)
        except TypeError as err:  # a dtype NumPy cannot represent (e.g. float8)
            raise WeightLoadError(f"{file}: tensor {name!r} has dtype {dtype}, which cannot be read: {err}") from None

    def to_canonical(self, name: str) -> str | None:
        return translate(name, self._block, self._global, BLOCK_TABLE)

    def file_name(self, canonical: str) -> str:
        layer, suffix = split_block_name(canonical)
        return self.prefix + (canonical if layer is None else f"h.{layer}.{suffix}")

    def is_ignored(self, name: str) -> bool:
        return name == LM_HEAD or bool(_BUFFER.match(name))

    def extra_problems(self, found: Mapping[str, str]) -> list[str]:
        """Our head is tied to ``wte``: an ``lm_head.weight`` that differs cannot be represented."""
        if LM_HEAD not in self._shapes or "wte.weight" not in found:
            return []
        wte_name = found["wte.weight"]
        if self._shapes[LM_HEAD] != self._shapes[wte_name]:
            return [
                f"{LM_HEAD!r} has shape {self._shapes[LM_HEAD]} but {wte_name!r} has {self._shapes[wte_name]}; "
                "this decoder's LM head is tied to the token embedding"
            ]
        if not np.array_equal(self.read(LM_HEAD), self.read(wte_name)):
            return [
                f"{LM_HEAD!r} differs from {wte_name!r}: the model was trained with an untied head, "
                "which this decoder (LM head tied to wte) cannot represent"
            ]
        return []

    def close(self) -> None:
        self._handles = {}


def save_hf_safetensors(arrays: Mapping[str, np.ndarray], config: GPT2Config, out_dir: Path) -> Path:
    """Write what ``GPT2LMHeadModel.save_pretrained`` would: prefixed keys, tied head omitted."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {PREFIX + name: np.ascontiguousarray(array, dtype=np.float32) for name, array in arrays.items()}
    path = out_dir / "model.safetensors"
    # transformers refuses safetensors files without a "format" entry in the metadata.
    save_file(tensors, str(path), metadata={"format": "pt"})
    hf_config = {
        **config.to_hf_dict(),
        "architectures": ["GPT2LMHeadModel"],
        "activation_function": "gelu_new",
        "n_inner": None,
        "tie_word_embeddings": True,
    }
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return path
