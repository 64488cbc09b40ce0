"""Decode plans: every plan decodes what the eager loop decodes, on any machine.

A plan is forced through the plan itself (a :class:`Tuning` argument with small
thresholds, or ``jit_compile``), never by patching module state, so each of the shapes a
tuning table can select runs here, whichever CPU runs the tests: rows below, at and
above each threshold, the whole-program XLA loop a GPU gets by default (run on this
CPU), and the float32 graph loop above the wide limit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from gpt2_effnet.config import GPT2Config
from gpt2_effnet.decoding import compiled_programs, generate, plan_for
from gpt2_effnet.decoding.base import GenerationConfig
from gpt2_effnet.decoding.plan import DecodePlan, make_plan
from gpt2_effnet.decoding.tuning import TABLE, Tuning, as_tuning, read_entries
from gpt2_effnet.gpt2 import GPT2Decoder
from gpt2_effnet.machine import Machine

# Thresholds small enough to place every row count of interest in a few rows.
SMALL = Tuning(name="small", xla_loop_rows=2, wide_loop_rows=8, transposed_head_rows=(2, 4), split_one_row=True)
COPIES = dataclasses.replace(SMALL, name="small-copies", transposed_head_rows=(0, 0), kernel_copies=True,
                             kernel_copies_max_bytes=2**30)
GPU = as_tuning(next(e for e in read_entries(TABLE) if e["name"] == "gpu"), TABLE)

ALL = ("greedy", "beam", "sampling")
# id -> (tuning, jit_compile, precision, rows, use_cache, the plan's fields that must hold, modes)
CASES = {
    "xla-loop-one-row-split": (SMALL, "auto", "float32", 1, True, dict(loop="xla", dense="split-one-row", head="stored"), ALL),
    "xla-loop-at-its-limit-head-copy-from": (SMALL, "auto", "float32", 2, True, dict(loop="xla", head="transposed", dense="stored"), ALL),
    "wide-loop-head-copy-to": (SMALL, "auto", "float32", 4, True, dict(loop="xla", head="transposed", dense="stored"), ALL),
    "wide-loop-at-its-limit-above-head-copy": (SMALL, "auto", "float32", 8, True, dict(loop="xla", head="stored"), ALL),
    "float32-graph-loop-above-wide": (SMALL, "auto", "float32", 16, True,
                                      dict(program="graph", loop="in-program", token_choice="xla", cache_write="in-place"), ALL),
    "narrow-loop-no-kernel-copies": (COPIES, "auto", "float32", 2, True, dict(loop="xla", dense="stored"), ("beam",)),
    "wide-loop-kernel-copies": (COPIES, "auto", "float32", 4, True, dict(loop="xla", dense="transposed"), ALL),
    "gpu-default-whole-program-xla": (GPU, "auto", "float32", 2, True, dict(program="xla", loop="in-program", dense="stored"), ALL),
    "gpu-default-one-row": (GPU, "auto", "float32", 1, True, dict(program="xla", dense="stored"), ALL),
    "jit-compile-true-one-row-split": (SMALL, True, "float32", 1, True, dict(program="xla", dense="split-one-row"), ALL),
    "jit-compile-false-no-xla": (SMALL, False, "float32", 2, True,
                                 dict(program="graph", loop="in-program", token_choice="in-step", cache_write="in-place"), ALL),
    "bfloat16-head-xla-loop-one-row-split": (SMALL, "auto", "bfloat16-head", 1, True, dict(loop="xla", head="bfloat16", dense="split-one-row"), ALL),
    "bfloat16-head-xla-loop": (SMALL, "auto", "bfloat16-head", 2, True, dict(loop="xla", head="bfloat16"), ("beam",)),
    "bfloat16-head-graph-loop": (SMALL, "auto", "bfloat16-head", 4, True, dict(loop="in-program", head="bfloat16", token_choice="xla"), ("sampling",)),
    "bfloat16-head-whole-program-xla": (GPU, "auto", "bfloat16-head", 2, True, dict(program="xla", head="bfloat16"), ("beam",)),
    "bfloat16-head-whole-program-xla-one-row": (SMALL, True, "bfloat16-head", 1, True, dict(program="xla", head="bfloat16", dense="split-one-row"), ("greedy",)),
    "bfloat16-head-no-xla": (SMALL, False, "bfloat16-head", 2, True, dict(program="graph", head="bfloat16", cache_write="in-place"), ("greedy",)),
    "bfloat16-decoder-graph-loop": (SMALL, "auto", "bfloat16", 2, True, dict(loop="in-program", decoder="bfloat16", token_choice="xla"), ALL),
    "bfloat16-decoder-no-xla": (SMALL, False, "bfloat16", 2, True, dict(program="graph", decoder="bfloat16", token_choice="in-step"), ("sampling",)),
    "bfloat16-decoder-whole-program-xla": (GPU, "auto", "bfloat16", 2, True, dict(program="xla", decoder="bfloat16"), ("beam",)),
    "bfloat16-decoder-whole-program-xla-one-row": (SMALL, True, "bfloat16", 1, True, dict(program="xla", decoder="bfloat16", dense="split-one-row"), ("greedy",)),
    "no-cache-graph": (SMALL, "auto", "float32", 2, False, dict(program="graph", cache=False, token_choice="in-step"), ("beam",)),
    "no-cache-whole-program-xla": (GPU, "auto", "float32", 2, False, dict(program="xla", cache=False), ("sampling",)),
    "no-cache-bfloat16-head-graph": (SMALL, "auto", "bfloat16-head", 2, False, dict(program="graph", head="bfloat16"), ("greedy",)),
    "no-cache-bfloat16-head-xla": (SMALL, True, "bfloat16-head", 2, False, dict(program="xla", head="bfloat16"), ("beam",)),
    "no-cache-bfloat16-decoder-graph": (SMALL, "auto", "bfloat16", 2, False, dict(program="graph", decoder="bfloat16"), ("sampling",)),
    "no-cache-bfloat16-decoder-xla": (GPU, "auto", "bfloat16", 2, False, dict(program="xla", decoder="bfloat16"), ("greedy",)),
}
# mode -> (generate keywords, how many rows each input decodes as)
MODES = {
    "greedy": ({}, 1),
    "beam": ({"num_beams": 2}, 2),
    "sampling": ({"do_sample": True, "top_k": 6, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 3,
                  "num_return_sequences": 2}, 2),
}
PARAMS = [pytest.param(case, mode, id=f"{case}-{mode}") for case, spec in CASES.items() for mode in spec[-1]
          if spec[3] % MODES[mode][1] == 0]


def tiny_decoder(seed: int = 5) -> GPT2Decoder:
    """Random GPT-2 with large weights, so that scores are far apart (no near-ties)."""
    decoder = GPT2Decoder(GPT2Config(vocab_size=14, n_positions=24, n_embd=16, n_layer=2, n_head=2))
    rng = np.random.default_rng(seed)
    for variable in decoder.weights:
        variable.assign(rng.normal(0.0, 0.5, variable.shape).astype("float32"))
    return decoder


@pytest.fixture(scope="module")
def decoder() -> GPT2Decoder:
    return tiny_decoder()


@pytest.fixture(scope="module")
def eager_results() -> dict:
    return {}


@pytest.mark.parametrize("case, mode", PARAMS)
def test_every_plan_decodes_what_the_eager_loop_does(decoder, eager_results, case, mode) -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("plans other than eager and jax.jit are TensorFlow's")
    tuning, jit, precision, rows, use_cache, expected, _ = CASES[case]
    kwargs, per_input = MODES[mode]
    batch = rows // per_input
    prompts = np.random.default_rng(rows).integers(0, 14, (batch, 3))
    common = dict(max_new_tokens=6, eos_token_id=3, return_scores=True, precision=precision, use_cache=use_cache, **kwargs)
    plan = plan_for(decoder, batch, jit_compile=jit, tuning=tuning, **common)
    assert plan.rows == rows
    assert {name: getattr(plan, name) for name in expected} == expected, plan
    got = generate(decoder, prompts, jit_compile=jit, tuning=tuning, **common)
    assert any(key[1] == plan for key in compiled_programs(decoder)), "the call did not run this plan"
    key = (batch, mode, precision)
    if key not in eager_results:
        eager_results[key] = generate(decoder, prompts, compile=False, **{**common, "use_cache": True})
    eager = eager_results[key]
    if precision != "bfloat16":
        np.testing.assert_array_equal(got.sequences, eager.sequences)
        np.testing.assert_allclose(got.scores, eager.scores, atol=1e-4 if precision == "float32" else 1e-3)
        return
    # A bfloat16 decoder rounds differently eagerly, in a graph (oneDNN fuses products and
    # biases) and under XLA, so a near-tie can go either way and the rest of the row with it
    # (it does in two of these cases, on main as here; tests/test_precision.py bounds how
    # often). The first token and the scores must agree.
    first = prompts.shape[1]
    np.testing.assert_array_equal(got.sequences[:, first], eager.sequences[:, first])
    np.testing.assert_allclose(got.scores, eager.scores, rtol=0.02)


ROW_COUNTS = sorted({b * r for b in (1, 2, 4, 8, 16, 32, 64, 128) for r in (1, 2, 3)})


def _structure(plan: DecodePlan) -> tuple:
    return tuple(value for name, value in dataclasses.asdict(plan).items() if name not in ("rows", "tuning", "backbone"))


def test_every_plan_a_table_entry_selects_is_one_the_equivalence_test_runs(decoder) -> None:
    """Whatever machine runs the tests, the plans the real table selects anywhere (every entry,
    batch sizes 1-128, greedy / beam 3 / 2 return sequences, each precision, each jit
    setting, with and without the cache) have shapes the test above decodes; and each entry's thresholds are where it
    says: the rows at a limit take the branch, one bucket above do not."""
    tested = set()
    for tuning, jit, precision, rows, use_cache, _, _ in CASES.values():
        config = GenerationConfig(max_new_tokens=6, precision=precision)
        tested.add(_structure(make_plan(decoder, config, rows, use_cache=use_cache, jit_compile=jit, tuning=tuning)))
    entries = [as_tuning(entry, TABLE) for entry in read_entries(TABLE)]
    assert [t.name for t in entries][-1] == "cpu" and "gpu" in [t.name for t in entries]
    for tuning in entries:
        for precision in ("float32", "bfloat16-head", "bfloat16"):
            for jit, use_cache, rows in itertools.product(("auto", True, False), (True, False), ROW_COUNTS):
                config = GenerationConfig(max_new_tokens=6, precision=precision)
                plan = make_plan(decoder, config, rows, use_cache=use_cache, jit_compile=jit, tuning=tuning)
                assert _structure(plan) in tested, (tuning.name, plan)
        if tuning.whole_program_xla:
            continue
        config = GenerationConfig(precision="float32")
        limit = max(tuning.xla_loop_rows, tuning.wide_loop_rows)
        assert make_plan(decoder, config, limit, tuning=tuning).loop == "xla"
        assert make_plan(decoder, config, limit + 1, tuning=tuning).loop == "in-program"
        low, high = tuning.transposed_head_rows
        if high:
            assert make_plan(decoder, config, high, tuning=tuning).head == "transposed"
            assert make_plan(decoder, config, high + 1, tuning=tuning).head == "stored"
            assert make_plan(decoder, config, low - 1, tuning=tuning).head == "stored"


def test_kernel_copies_stay_within_their_memory_limit(decoder) -> None:
    """A model whose [N, K] copies would exceed the entry's limit keeps the graph loop."""
    from gpt2_effnet.decoding.kernels import copies_bytes

    need = copies_bytes(decoder)
    assert need == 4 * 2 * (16 * 48 + 16 * 16 + 16 * 64 + 64 * 16)
    config = GenerationConfig(precision="float32")
    for limit, loop in ((need, "xla"), (need - 1, "in-program")):
        tuning = dataclasses.replace(COPIES, kernel_copies_max_bytes=limit)
        assert make_plan(decoder, config, 4, tuning=tuning).loop == loop


def test_one_program_per_plan_and_the_plan_in_its_key(decoder) -> None:
    """Two plans for the same settings are two programs; the same plan is one, reused."""
    prompts = np.random.default_rng(0).integers(0, 14, (2, 3))
    model = tiny_decoder()
    for tuning in (SMALL, dataclasses.replace(SMALL, name="no-head-copy", transposed_head_rows=(0, 0)), SMALL):
        generate(model, prompts, max_new_tokens=4, eos_token_id=3, tuning=tuning)
    plans = [plan for _, plan in compiled_programs(model)]
    assert len(plans) == 2 and {p.head for p in plans} == {"transposed", "stored"}


def test_the_tuning_comes_from_the_environment_else_the_local_file_else_the_table(tmp_path, monkeypatch) -> None:
    from gpt2_effnet.decoding import tuning as tuning_module

    zen = Machine("cpu", 2, frozenset({"avx2", "avx512f", "avx512_bf16"}), "test")
    amx = Machine("cpu", 2, frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}), "test")
    other = Machine("cpu", 8, frozenset({"avx2"}), "test")
    gpu = Machine("gpu", 8, frozenset({"avx2"}), "test")
    monkeypatch.delenv(tuning_module.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    names = {m: tuning_module.resolve(m).name for m in (zen, amx, other, gpu)}
    assert names == {zen: "amd-epyc-zen5-2-cores", amx: "intel-xeon-amx-2-cores", other: "cpu", gpu: "gpu"}
    # A measured local entry applies to its machine only.
    entry = {"name": "measured-here", "match": {"device": "cpu", "cores": 8, "features": ["avx2"]},
             "tuning": {"xla_loop_rows": 4}}
    tuning_module.write_local(entry)
    assert tuning_module.resolve(other) == Tuning(name="measured-here", xla_loop_rows=4,
                                                  source=str(tuning_module.local_path()))
    assert tuning_module.resolve(zen).name == "amd-epyc-zen5-2-cores"
    # The environment's file wins, and must fit the machine.
    forced = tmp_path / "forced.json"
    forced.write_text(json.dumps({"entries": [{"name": "forced", "match": {}, "tuning": {"wide_loop_rows": 32}}]}))
    monkeypatch.setenv(tuning_module.ENV, str(forced))
    assert tuning_module.resolve(zen).wide_loop_rows == 32 and tuning_module.resolve(gpu).name == "forced"
    forced.write_text(json.dumps({"entries": [{"name": "gpu only", "match": {"device": "gpu"}}]}))
    with pytest.raises(ValueError, match="no entry matches"):
        tuning_module.resolve(zen)
    forced.write_text(json.dumps({"entries": [{"name": "typo", "tuning": {"wide_rows": 3}}]}))
    with pytest.raises(ValueError, match="wide_rows"):
        tuning_module.resolve(zen)


def test_the_kernels_compute_the_plain_products(decoder, rng) -> None:
    """Each kernel against the plain one (and float64): dense products (split one row, kernel
    copies), the head (a [W, V] copy, a bfloat16 copy), and in-place cache writes, which
    write only buffers the loop owns, only in a plain graph, and into buffers of their own."""
    import keras
    import tensorflow as tf
    from keras import ops

    from gpt2_effnet.decoding.kernels import DecodeKernels, prepare
    from gpt2_effnet.layers import KVCache

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the in-place write and the XLA context are TensorFlow's")
    layer = decoder.blocks[0].c_fc
    for dense in ("split-one-row", "transposed"):
        plan = DecodePlan(rows=1, dense=dense)
        kernels = DecodeKernels(plan, decoder, prepare(plan, decoder, True))
        for shape in ((1, 1, 16), (3, 2, 16)):
            x = rng.normal(0, 1, shape).astype("float32")
            exact = x.astype(np.float64) @ np.asarray(layer.kernel, np.float64) + np.asarray(layer.bias)
            got = tf.function(lambda v: kernels.dense(layer, v), jit_compile=True)(tf.constant(x))
            np.testing.assert_allclose(np.asarray(got), exact, rtol=0, atol=1e-5)
    hidden = rng.normal(0, 1, (3, 2, 16)).astype("float32")
    plain = np.asarray(decoder.head(hidden))
    for head, atol in (("transposed", 1e-5), ("bfloat16", 0.05 * np.abs(plain).max())):
        plan = DecodePlan(rows=3, head=head)
        for specials in (True, False):
            got = np.asarray(decoder.head(hidden, kernels=DecodeKernels(plan, decoder, prepare(plan, decoder, specials),
                                                                        specials)))
            np.testing.assert_allclose(got, plain, rtol=0, atol=atol)

    plan = DecodePlan(rows=3, cache_write="in-place")
    kernels = DecodeKernels(plan, decoder, prepare(plan, decoder, True))
    base = rng.normal(0, 1, (3, 2, 5, 4)).astype("float32")
    new = rng.normal(0, 1, (3, 2, 1, 4)).astype("float32")
    parents = np.array([2, 0, 0], np.int32)
    for rows in (None, parents):
        expected = (base if rows is None else base[rows]).copy()
        expected[:, :, 2:3] = new
        for owned in (True, False):
            def fill_and_write(values, update, index):
                buffer = kernels.new_buffer(values.shape, "float32") + values  # a computed buffer: ours
                return kernels.write(buffer, update, KVCache(None, index, None if rows is None else tf.constant(rows), owned))

            for jit in (False, True):
                fn = tf.function(fill_and_write, jit_compile=jit)
                arguments = (tf.constant(base), tf.constant(new), tf.constant(2))
                np.testing.assert_array_equal(np.asarray(fn(*arguments)), expected)
                ops_used = {op.type for op in fn.get_concrete_function(*arguments).graph.get_operations()}
                assert ("InplaceUpdate" in ops_used) == ((owned or rows is not None) and not jit), (rows, owned, jit)
    eager_base = tf.constant(base)
    np.testing.assert_array_equal(np.asarray(kernels.write(eager_base, new, KVCache(None, 2, owned=True)))[:, :, 2:3], new)
    np.testing.assert_array_equal(np.asarray(eager_base), base)  # eagerly: a copy, never in place

    @tf.function
    def two_buffers(index):
        first, second = (kernels.new_buffer((2, 1, 4, 3), "float32") for _ in range(2))
        return kernels.write(first, tf.ones((2, 1, 1, 3)), KVCache(None, index, owned=True)), second

    for index in (1, 3):  # zeros at every call and apart: a shared constant written in place would leak
        written, other = (np.asarray(t) for t in two_buffers(tf.constant(index)))
        want = np.zeros((2, 1, 4, 3), np.float32)
        want[:, :, index] = 1.0
        np.testing.assert_array_equal(written, want)
        np.testing.assert_array_equal(other, 0.0)
    del ops


def test_explain_names_every_choice_and_where_the_tuning_came_from(decoder) -> None:
    plan = plan_for(decoder, 3, num_beams=2, tuning=SMALL)
    text = plan.explain()
    assert plan.rows == 8 and "8 row(s)" in text
    for field in dataclasses.fields(DecodePlan):
        if field.name != "rows":
            assert field.name in text
    assert "small" in text and "[W, V] copy" not in text  # 8 rows: above the head copy's range
    with pytest.raises(ValueError, match="head"):
        DecodePlan(rows=1, head="sideways")


@pytest.mark.gpu
def test_the_gpu_default_decodes_on_the_gpu_what_the_eager_loop_does() -> None:
    """Where TensorFlow sees a GPU, the default plan is the whole call as one XLA program,
    on that GPU; its tokens equal the eager loop's (large weights: no near-ties)."""
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        pytest.skip("no GPU visible to TensorFlow")
    decoder = tiny_decoder(7)
    prompts = np.random.default_rng(2).integers(0, 14, (4, 3))
    for kwargs in ({}, {"num_beams": 3}, {"do_sample": True, "top_k": 5, "seed": 2}):
        assert plan_for(decoder, 4, **kwargs).program == "xla"
        common = dict(max_new_tokens=6, eos_token_id=3, return_scores=True, **kwargs)
        with tf.device("/GPU:0"):
            got = generate(decoder, prompts, **common)
        eager = generate(decoder, prompts, compile=False, **common)
        np.testing.assert_array_equal(got.sequences, eager.sequences)
        np.testing.assert_allclose(got.scores, eager.scores, atol=1e-3)


def test_tune_writes_an_entry_for_this_machine_that_the_plans_then_read(tmp_path, monkeypatch, capsys) -> None:
    """A short ``gpt2-effnet tune`` (a small model, one pair): the entry it writes names what it
    measured and matches this machine only; named by the environment, the plans read it."""
    from gpt2_effnet.cli import main
    from gpt2_effnet.decoding import tuning as tuning_module
    from gpt2_effnet.machine import current_machine

    out = tmp_path / "tuning.json"
    code = main(["tune", "--width", "32", "--layers", "1", "--tokens", "1", "--pairs", "1",
                 "--only", "split_one_row", "xla_loop_rows", "--out", str(out)])
    assert code == 0 and "wrote" in capsys.readouterr().err
    (entry,) = json.loads(out.read_text())["entries"]
    assert set(entry["tuning"]) == {"split_one_row", "xla_loop_rows", "whole_program_xla"}
    assert set(entry["measured"]["evidence"]) == {"split_one_row", "xla_loop_rows"}
    assert entry["measured"]["command"].startswith("gpt2-effnet tune")
    machine = current_machine()
    monkeypatch.setenv(tuning_module.ENV, str(out))
    assert tuning_module.resolve(machine) == tuning_module.as_tuning(entry, out)
    other = dataclasses.replace(machine, cores=machine.cores + 1)
    with pytest.raises(ValueError, match="no entry matches"):
        tuning_module.resolve(other)
