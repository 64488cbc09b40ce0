"""How a decode call is compiled and computed: one frozen, printable :class:`DecodePlan`,
made by :func:`make_plan` from the request, the model and the tuning (:mod:`.tuning`).

The plan is part of the key a compiled program is kept under, so a program never serves
a request another plan would run. Overrides are arguments (``jit_compile``, ``tuning``)
or the process's tuning file (``GPT2_EFFNET_TUNING``), never module switches.

Why the shapes: on a GPU, XLA compiles the whole call. On a CPU the image encoder stays
a plain graph (oneDNN's convolutions: one image 57 ms under XLA, 24 ms without) and the
loop after it (prefill, every step, the token choice, the beam bookkeeping) is its own
XLA program up to the tuning's rows, which runs the steps back to back without the
graph executor's per-step launches; a larger loop stays a graph, where hundreds of small
ops a step cost less than XLA's slower products, with only its token choice (passes
over the whole vocabulary) as an XLA program. A ``bfloat16`` decoder keeps the graph at
every size (XLA's CPU dot has no fast bfloat16 path: 2.9x slower for GPT-2 124M at one
row). ``jit_compile=False`` keeps XLA out altogether, as the SavedModel export must (TF
Serving's CPU build refuses XLA programs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import keras

from .kernels import copies_bytes
from .tuning import Tuning, current_tuning

JitSetting = bool | str

# Every value a plan's field can take, and what it means.
MEANINGS: dict[str, dict[Any, str]] = {
    "program": {
        "eager": "no compiled program: every op runs as it is called (compile=False, PyTorch)",
        "graph": "the whole call (image encoder, prefill, loop) is one TensorFlow graph",
        "xla": "the whole call is one XLA program (jit_compile=True; the GPU default)",
        "jax": "the whole call is one jax.jit program",
    },
    "loop": {
        "in-program": "the decode loop runs inside that program",
        "xla": "the decode loop after the image encoder is its own XLA program, called from the graph",
    },
    "token_choice": {
        "in-step": "the token choice runs inside each step",
        "xla": "each step's token choice (passes over the vocabulary) is its own XLA program",
    },
    "head": {
        "stored": "the head multiplies the token table as stored, [V, W]",
        "transposed": "the head multiplies a [W, V] copy of the table made once per call",
        "bfloat16": "the head multiplies a bfloat16 copy of the table, summing in float32",
    },
    "dense": {
        "stored": "block products multiply the kernels as stored",
        "transposed": "block products multiply [N, K] copies of the kernels made once per call",
        "split-one-row": "a one-row block product runs as two half-products (a thread each)",
    },
    "cache_write": {
        "copy": "each step's keys and values are written into a new copy of the cache buffers",
        "in-place": "each step writes its keys and values into the loop's own cache buffers",
    },
    "decoder": {"float32": "the decoder's float32 weights", "bfloat16": "a bfloat16 copy of the decoder"},
    "backbone": {"float32": "the image backbone in float32", "bfloat16": "the image backbone in bfloat16"},
    "cache": {True: "steps read the KV cache", False: "every step recomputes the whole prefix"},
}


@dataclass(frozen=True)
class DecodePlan:
    """Every choice of one decode call (see :data:`MEANINGS`)."""

    rows: int  # decode rows: the (bucketed) batch times the beams or return sequences
    program: str = "eager"
    loop: str = "in-program"
    token_choice: str = "in-step"
    head: str = "stored"
    dense: str = "stored"
    cache_write: str = "copy"
    decoder: str = "float32"
    backbone: str = "float32"
    cache: bool = True
    tuning: str = ""  # the tuning entry its thresholds came from, and where it was read

    def __post_init__(self) -> None:
        for name, meanings in MEANINGS.items():
            if getattr(self, name) not in meanings:
                raise ValueError(f"DecodePlan.{name} must be one of {list(meanings)}, got {getattr(self, name)!r}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def explain(self) -> str:
        lines = [f"decode plan for {self.rows} row(s):"]
        for name, meanings in MEANINGS.items():
            value = getattr(self, name)
            lines.append(f"  {name:<12} {str(value):<13} {meanings[value]}")
        if self.tuning:
            lines.append(f"  {'tuning':<12} {self.tuning}")
        return "\n".join(lines)


def make_plan(
    decoder: Any,
    config: Any,
    rows: int,
    *,
    use_cache: bool = True,
    compile: bool = True,
    jit_compile: JitSetting = "auto",
    tuning: Tuning | None = None,
) -> DecodePlan:
    """The plan for decoding ``rows`` rows of ``decoder`` under ``config`` (a GenerationConfig).

    ``jit_compile``: True, False or "auto" (the tuning decides); ``tuning``: None reads
    this process's (:func:`~.tuning.current_tuning`)."""
    if jit_compile not in (True, False, "auto"):
        raise ValueError(f"jit_compile must be True, False or 'auto', got {jit_compile!r}")
    precision = config.precision
    fixed = dict(rows=rows, decoder="bfloat16" if precision == "bfloat16" else "float32",
                 head="bfloat16" if precision == "bfloat16-head" else "stored",
                 backbone=config.backbone_precision, cache=use_cache)
    backend = keras.backend.backend()
    if not compile or backend not in ("tensorflow", "jax"):
        return DecodePlan(program="eager", **fixed)
    if backend == "jax":
        return DecodePlan(program="jax", **fixed)
    tuning = tuning or current_tuning()
    fixed["tuning"] = f"{tuning.name} ({tuning.source})" if tuning.source else tuning.name
    split = use_cache and rows == 1 and tuning.split_one_row
    if jit_compile is True or (jit_compile == "auto" and tuning.whole_program_xla):
        return DecodePlan(program="xla", dense="split-one-row" if split else "stored", **fixed)
    narrow = 0 if precision == "bfloat16" else tuning.xla_loop_rows
    copies_fit = not tuning.kernel_copies or copies_bytes(decoder) <= tuning.kernel_copies_max_bytes
    wide = tuning.wide_loop_rows if precision == "float32" and copies_fit else 0
    if jit_compile is False or not use_cache or rows > max(narrow, wide):
        choice = "xla" if jit_compile == "auto" and use_cache else "in-step"
        return DecodePlan(program="graph", token_choice=choice, cache_write="in-place" if use_cache else "copy", **fixed)
    low, high = tuning.transposed_head_rows
    if precision == "float32" and low <= rows <= high:
        fixed["head"] = "transposed"
    dense = "transposed" if rows > narrow and tuning.kernel_copies else "split-one-row" if split else "stored"
    return DecodePlan(program="graph", loop="xla", dense=dense, **fixed)


def compile_program(fn: Callable[..., Any], plan: DecodePlan) -> Callable[..., Any]:
    """``fn`` compiled as ``plan.program`` says. TensorFlow: without AutoGraph (the loops use
    ``keras.ops`` control flow already; converting their source cost ~1.2 s of a 2.7 s trace)."""
    if plan.program == "eager":
        return fn
    if plan.program == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn, jit_compile=plan.program == "xla", autograph=False)


def xla_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as its own XLA program, called from a TensorFlow graph."""
    import tensorflow as tf

    return tf.function(fn, jit_compile=True, autograph=False)


def graph_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as one TensorFlow graph where that is the backend (many small ops without Python
    between them), else ``fn``: for side effects on variables, which ``jax.jit`` would drop."""
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf

    return tf.function(fn, autograph=False)
