"""Pretrained GPT-2 weights: HF safetensors / tf_model.h5, OpenAI checkpoints and our own folder.

Every reader maps its file's names to the decoder's canonical names through an explicit
table; loading is strict by default and never unpickles anything.
"""

from .common import LoadReport, ShapeMismatch, WeightLoadError, expected_shapes
from .loader import FORMATS, WeightFormatError, detect_format, load_gpt2, load_into, open_reader, read_weights, resolve
from .native import save_native

__all__ = [
    "FORMATS",
    "LoadReport",
    "ShapeMismatch",
    "WeightFormatError",
    "WeightLoadError",
    "detect_format",
    "expected_shapes",
    "load_gpt2",
    "load_into",
    "open_reader",
    "read_weights",
    "resolve",
    "save_native",
]
