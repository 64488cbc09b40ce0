"""Which compute precision a run uses when its config says ``train.precision: auto``.

bfloat16 matmuls and convolutions run on dedicated hardware on recent CPUs (AVX-512 BF16
on AMD Zen 4 and Intel Cooper Lake on, AMX on Sapphire Rapids on; TensorFlow reaches it
through oneDNN) and on GPUs of compute capability 8.0 and above. There, ``auto`` picks
``mixed_bfloat16``: layers compute in bfloat16 while variables, the optimizer's state,
the logits and the loss stay float32 (BENCHMARKS.md has the speed and the loss curves).
Everywhere else bfloat16 is emulated and slower, so ``auto`` stays float32.
"""

from __future__ import annotations

from ..machine import cpu_flags

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool:
    return any(flag in cpu_flags(cpuinfo) for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``mixed_bfloat16`` where the hardware computes bfloat16 natively, else ``float32``."""
    if precision != "auto":
        return precision
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        return "mixed_bfloat16" if capability is not None and tuple(capability) >= (8, 0) else "float32"
    return "mixed_bfloat16" if cpu_has_bfloat16() else "float32"
