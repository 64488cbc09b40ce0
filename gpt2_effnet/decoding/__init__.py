"""Caption and text generation: greedy, beam search, top-k/top-p/temperature sampling.

Every sampler runs its decode loop over a preallocated static KV cache; see :mod:`.base`
(step function), :mod:`.beam` (beam search and its length penalty), :mod:`.sampling`
(seeded sampling) and :mod:`.processors`. How a call is compiled and computed (one XLA
program, a graph calling an XLA loop, a plain graph, or eager ops on PyTorch) is a
:class:`~.plan.DecodePlan` (:mod:`.plan`), made from the request, the model and the
machine's tuning (:mod:`.tuning`); its kernels are in :mod:`.kernels`.

Names are imported lazily, so ``gpt2-effnet caption --help`` does not pay for Keras.
"""

from __future__ import annotations

from gpt2_effnet._lazy import lazy_exports

_EXPORTS = {
    "DecodeModel": "gpt2_effnet.decoding.base",
    "DecodePlan": "gpt2_effnet.decoding.plan",
    "Tuning": "gpt2_effnet.decoding.tuning",
    "compiled_programs": "gpt2_effnet.decoding.api",
    "plan_for": "gpt2_effnet.decoding.api",
    "GenerationConfig": "gpt2_effnet.decoding.base",
    "GenerationOutput": "gpt2_effnet.decoding.base",
    "caption_strings": "gpt2_effnet.decoding.api",
    "check_generation": "gpt2_effnet.decoding.api",
    "decoding_kwargs": "gpt2_effnet.decoding.api",
    "cut_at_eos": "gpt2_effnet.decoding.api",
    "generate": "gpt2_effnet.decoding.api",
    "generate_captions": "gpt2_effnet.decoding.api",
    "make_config": "gpt2_effnet.decoding.api",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
