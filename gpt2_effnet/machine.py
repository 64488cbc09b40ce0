"""What this process runs on, as measured facts: device kind, CPU cores, ISA features.

Speed choices that depend on the machine key on these (decoding's tuning table), never on
a maker's name: two CPUs of one maker can want opposite layouts.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

# The ISA features a tuning entry may name (the flags /proc/cpuinfo spells).
FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_name(cpuinfo: str) -> str:
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():
            break
    name = fields.get("model name", "unknown CPU")
    if "cpu family" in fields:  # some VMs name no model: family and model tell them apart
        name += f" (family {fields['cpu family']} model {fields.get('model', '?')})"
    return name


@dataclass(frozen=True)
class Machine:
    device: str  # "gpu" where TensorFlow sees one, else "cpu"
    cores: int  # CPUs this process may run on
    features: frozenset[str]  # those of FEATURES the CPU has
    name: str  # for provenance only; nothing keys on it

    def describe(self) -> str:
        features = ", ".join(sorted(self.features)) or "none of " + ", ".join(FEATURES)
        return f"{self.device}: {self.name}, {self.cores} cores, {features}"


@functools.lru_cache(maxsize=1)
def current_machine() -> Machine:
    """This process's machine, probed once (a GPU only counts where TensorFlow is the backend)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    features = frozenset(flag for flag in FEATURES if flag in cpu_flags(cpuinfo))
    return Machine("gpu" if _tensorflow_gpu() else "cpu", cores, features, _cpu_name(cpuinfo))


def _tensorflow_gpu() -> bool:
    import keras

    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU"))
