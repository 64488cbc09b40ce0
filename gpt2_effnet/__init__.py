"""gpt2-effnet: image captioning with a pretrained GPT-2 and an EfficientNet encoder.

Public names are imported lazily so that light tools (the tokenizer, the downloader)
do not pay for importing TensorFlow.
"""

from __future__ import annotations

from gpt2_effnet._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "GPT2Config": "gpt2_effnet.config",
    "CaptionerConfig": "gpt2_effnet.config",
    "ConfigError": "gpt2_effnet.config",
    "GPT2Tokenizer": "gpt2_effnet.tokenizer",
    "GPT2Decoder": "gpt2_effnet.gpt2",
    "ImageEncoder": "gpt2_effnet.encoder",
    "Captioner": "gpt2_effnet.captioner",
    "load_gpt2": "gpt2_effnet.weights",
    "generate": "gpt2_effnet.decoding",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
