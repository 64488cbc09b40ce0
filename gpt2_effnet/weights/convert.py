"""``gpt2-effnet convert SRC --out DST``: any supported GPT-2 weights -> our folder (or HF safetensors).

Converting once means later loads read one small, checked format; ``--to safetensors``
goes the other way, to a folder Hugging Face ``from_pretrained`` opens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .common import LoadReport
from .loader import load_gpt2
from .native import WEIGHTS_FILE, save_native

# Tokenizer files travel with the weights, so the output folder is self-contained.
TOKENIZER_FILES: tuple[str, ...] = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "encoder.json",
    "vocab.bpe",
)
TARGETS: tuple[str, ...] = ("native", "safetensors")


def convert(
    src: str | Path,
    out: str | Path,
    to: str = "native",
    format: str | None = None,
    strict: bool = True,
    overwrite: bool = False,
) -> tuple[LoadReport, Path]:
    """Read ``src`` (checked like any load) and write it to ``out``; returns the load report and the file written."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; choose one of {TARGETS}")
    out = Path(out)
    target_file = out / (WEIGHTS_FILE if to == "native" else "model.safetensors")
    if target_file.exists() and not overwrite:
        raise FileExistsError(f"{target_file} already exists; pass --force to overwrite it")
    if Path(src).resolve() == out.resolve():
        raise ValueError(f"--out must differ from the source folder ({out})")
    decoder = load_gpt2(src, strict=strict, format=format)
    report: LoadReport = decoder.load_report
    out.mkdir(parents=True, exist_ok=True)
    if to == "native":
        written = save_native(decoder, out)
    else:
        from .hf_safetensors import save_hf_safetensors

        arrays = {name: variable.numpy() for name, variable in decoder.named_weights().items()}
        written = save_hf_safetensors(arrays, decoder.gpt2_config, out)
    src_dir = Path(src) if Path(src).is_dir() else Path(report.source).parent
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file() and src_dir.resolve() != out.resolve():
            shutil.copyfile(src_dir / name, out / name)
    return report, written
