"""The training loop's pieces (loss, clipping, schedule, run folder) and end-to-end learning.

References: the masked loss against a direct numpy computation and torch's cross_entropy,
clipping against TensorFlow's clip ops, the schedule against Keras' CosineDecay.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpt2_effnet.config import CaptionerConfig, ConfigError

# The kit's tiny config with GPT-2's real vocabulary (the captions are tokenised) and
# trainable embeddings.
TRAINING = {"real_vocabulary": True, "trainable": {"gpt2_embeddings": True}}


@pytest.fixture(scope="module")
def tiny(tiny_config_data) -> dict:
    return tiny_config_data(**TRAINING)


def _numpy_masked(logits: np.ndarray, token_ids: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    targets, weights = token_ids[:, 1:], mask[:, 1:].astype(np.float64)
    z = logits.astype(np.float64)
    log_probs = z - z.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    hits = (z.argmax(-1) == targets).astype(np.float64)
    return float((nll * weights).sum() / weights.sum()), float((hits * weights).sum() / weights.sum())


def test_masked_loss_and_accuracy_match_numpy_and_torch(rng: np.random.Generator) -> None:
    import torch

    from gpt2_effnet.training.loss import caption_accuracy, caption_loss, masked_cross_entropy_sum, next_token_split

    batch, length, vocab = 4, 7, 13
    token_ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    lengths = np.array([7, 3, 1, 5])  # row 2 has only BOS: no targets at all
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    logits = rng.normal(0, 3, (batch, length - 1, vocab)).astype(np.float32)
    # Make a few predictions right so accuracy is neither 0 nor 1.
    logits[0, 0, token_ids[0, 1]] += 20
    logits[3, 2, token_ids[3, 3]] += 20

    want_loss, want_acc = _numpy_masked(logits, token_ids, mask)
    got_loss = float(np.asarray(caption_loss(logits, token_ids, mask)))
    got_acc = float(np.asarray(caption_accuracy(logits, token_ids, mask)))
    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    assert got_acc == pytest.approx(want_acc, rel=1e-6)
    assert 0 < got_acc < 1

    ignored = np.where(mask[:, 1:] == 1, token_ids[:, 1:], -100).astype(np.int64)
    torch_loss = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).reshape(-1, vocab), torch.from_numpy(ignored).reshape(-1), ignore_index=-100
    )
    assert got_loss == pytest.approx(float(torch_loss), rel=1e-5)

    _, _, weights = next_token_split(token_ids, mask)
    total, count = masked_cross_entropy_sum(logits, token_ids[:, 1:], weights)
    assert float(np.asarray(count)) == mask[:, 1:].sum() == 6 + 2 + 0 + 4
    assert float(np.asarray(total)) == pytest.approx(want_loss * 12, rel=1e-5)


def test_clip_gradients_matches_tensorflow_and_commutes_with_loss_scale(rng: np.random.Generator) -> None:
    import tensorflow as tf

    from gpt2_effnet.training.optim import clip_gradients

    grads = [rng.normal(0, 2, (3, 4)).astype(np.float32), rng.normal(0, 2, (5,)).astype(np.float32)]
    ours = clip_gradients([tf.constant(g) for g in grads], clipvalue=1.0, global_clipnorm=1.5)
    by_value = [tf.clip_by_value(g, -1.0, 1.0) for g in grads]
    want, _ = tf.clip_by_global_norm(by_value, 1.5)
    for a, b in zip(ours, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    # Clipping loss-scaled gradients against scaled thresholds = scaling the clipped gradients.
    scaled = clip_gradients([tf.constant(g * 1024.0) for g in grads], 1.0, 1.5, scale=1024.0)
    for a, b in zip(scaled, ours):
        np.testing.assert_allclose(a.numpy() / 1024.0, b.numpy(), rtol=1e-5)
    # Small gradients pass untouched; non-finite ones stay non-finite (the fp16 optimizer skips them).
    small = clip_gradients([tf.constant(g * 1e-3) for g in grads], 1.0, 1.5)
    for a, g in zip(small, grads):
        np.testing.assert_allclose(a.numpy(), g * 1e-3, rtol=1e-6)
    bad = clip_gradients([tf.constant([np.inf, 1.0]), tf.constant([0.5])], None, 1.0)
    assert not np.all(np.isfinite(np.concatenate([b.numpy() for b in bad])))


def test_warmup_cosine_matches_keras_cosine_decay() -> None:
    import keras

    from gpt2_effnet.config import OptimConfig
    from gpt2_effnet.training.optim import WarmupCosine, learning_rate

    peak, warmup, total, floor = 1e-3, 10, 110, 0.1
    ours = learning_rate(OptimConfig(learning_rate=peak, schedule="cosine", warmup_steps=warmup,
                                     min_learning_rate_ratio=floor), total_steps=total)
    assert isinstance(ours, WarmupCosine)
    reference = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=total - warmup, alpha=floor, warmup_target=peak, warmup_steps=warmup
    )
    for step in range(0, 130, 3):
        got = float(keras.ops.convert_to_numpy(ours(step)))
        # Keras' warmup reaches step/warmup at `step`; ours reaches it one step earlier (no lr=0 step).
        want = float(keras.ops.convert_to_numpy(reference(step + 1 if step < warmup else step)))
        assert got == pytest.approx(want, rel=1e-5, abs=1e-12), step
    assert learning_rate(OptimConfig(learning_rate=peak), total_steps=None) == peak
    with pytest.raises(ValueError, match="decay_steps or train.steps"):
        learning_rate(OptimConfig(schedule="cosine"), total_steps=None)


def test_fused_adam_equals_keras_adam(rng: np.random.Generator) -> None:
    """The one-kernel update (TensorFlow's ApplyAdam) against Keras' own Adam, step by step."""
    import keras
    import tensorflow as tf

    from gpt2_effnet.training.optim import SummedGradientAdam, WarmupCosine

    shapes = [(7, 5), (5,), (3, 4, 2)]
    start = [rng.normal(0, 1, s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(0, g, s).astype(np.float32) for s, g in zip(shapes, (1.0, 1e-3, 30.0))] for _ in range(6)]
    results = []
    for cls in (SummedGradientAdam, keras.optimizers.Adam):
        weights = [keras.Variable(w) for w in start]
        optimizer = cls(learning_rate=WarmupCosine(3e-2, 2, 10, 0.1), beta_1=0.8, beta_2=0.95, epsilon=1e-6)
        optimizer.build(weights)

        @tf.function(autograph=False)
        def apply(step_grads: list, optimizer: keras.optimizers.Optimizer = optimizer) -> None:
            optimizer.apply(step_grads, weights)

        for step_grads in grads:
            apply([tf.constant(g) for g in step_grads])
        moments = [np.asarray(m) for m in optimizer._momentums + optimizer._velocities]
        results.append(([np.asarray(w) for w in weights], moments))
    (fused, fused_moments), (reference, reference_moments) = results
    for a, b, w0 in zip(fused, reference, start):
        assert np.abs(b - w0).max() > 1e-3  # the updates moved the weights
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_moments, reference_moments):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_optim_and_train_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="optim.global_clipnorm"):
        CaptionerConfig.from_dict({"optim": {"global_clipnorm": 0}})
    with pytest.raises(ConfigError, match="train.batch_size .* divisible by train.grad_accum_steps"):
        CaptionerConfig.from_dict({"train": {"batch_size": 6, "grad_accum_steps": 4}})
    with pytest.raises(ConfigError, match="'train.epoch'"):
        CaptionerConfig.from_dict({"train": {"epoch": 3}})


def test_run_folder_refuses_a_different_config(tiny, tmp_path: Path) -> None:
    from gpt2_effnet.training.checkpoints import RunConfigMismatch, prepare_run_dir

    config = CaptionerConfig.from_dict(tiny)
    data = {"train": {"kind": "csv", "file": "/data/a.csv"}}
    prepare_run_dir(tmp_path, config, data)
    assert CaptionerConfig.load(tmp_path / "config.yaml") == config
    # Same config again, or only a longer run: fine.
    prepare_run_dir(tmp_path, config, data)
    _, notes = prepare_run_dir(tmp_path, config.replace(train={"steps": 99}), data)
    assert any("train.steps" in n for n in notes)
    changed = config.replace(optim={"learning_rate": 0.5}, model={"dropout": 0.1})
    with pytest.raises(RunConfigMismatch) as err:
        prepare_run_dir(tmp_path, changed, data)
    assert "optim.learning_rate" in str(err.value) and "model.dropout" in str(err.value)
    assert "train.steps" not in str(err.value)
    with pytest.raises(RunConfigMismatch, match="data.train.file"):
        prepare_run_dir(tmp_path, config, {"train": {"kind": "csv", "file": "/data/b.csv"}})
    _, notes = prepare_run_dir(tmp_path, changed, data, override=True)
    assert any("--override" in n and "optim.learning_rate" in n for n in notes)
    assert CaptionerConfig.load(tmp_path / "config.yaml") == changed
    # Under a cosine over the run's length, the length is part of the learning rate.
    cosine = config.replace(optim={"schedule": "cosine"}, train={"steps": 100})
    prepare_run_dir(tmp_path / "cos", cosine, data)
    with pytest.raises(RunConfigMismatch, match="train.steps"):
        prepare_run_dir(tmp_path / "cos", cosine.replace(train={"steps": 200}), data)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    from gpt2_effnet.data.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("synthetic"), n_images=48, image_size=32, seed=3,
                           captions_per_image=2, val_fraction=0.2, shards_per=40, progress=False)


def _first_and_last_loss(history: list[dict]) -> tuple[float, float]:
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[0], losses[-1]


@pytest.mark.slow
def test_loss_falls_through_the_csv_pipeline(tiny, synthetic, tmp_path: Path) -> None:
    import keras

    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.training.loop import Trainer
    from gpt2_effnet.training.sources import caption_source, make_tokenizer

    config = CaptionerConfig.from_dict(tiny).replace(train={"steps": 24, "validate_every": 12, "validation_batches": 2})
    tokenizer = make_tokenizer(config)
    data = caption_source(config, tokenizer, csv=synthetic.train_csv)
    validation = caption_source(config, tokenizer, csv=synthetic.val_csv, training=False)
    trainer = Trainer(config, tmp_path / "run", data, validation=validation, show_progress=False)
    result = trainer.fit()
    first, last = _first_and_last_loss(result.history)
    assert result.step == 24 and result.interrupted is None
    assert last < first - 3.0, (first, last)  # ln(50258) = 10.8 at the start
    val = [h for h in result.history if "val_loss" in h]
    assert [h["step"] for h in val] == [12, 24] and val[-1]["val_loss"] < val[0]["val_loss"]
    # TensorBoard: the logged windows' losses, as tf.summary wrote them.
    logged = _scalars(tmp_path / "run" / "logs" / "train", "loss")
    assert [step for step, _ in logged] == [h["step"] for h in result.history if "loss" in h]
    np.testing.assert_allclose([v for _, v in logged], [h["loss"] for h in result.history if "loss" in h], rtol=1e-6)
    assert [s for s, _ in _scalars(tmp_path / "run" / "logs" / "val", "loss")] == [12, 24]
    # The vocabulary travels with the run, for caption and evaluate.
    from gpt2_effnet.tokenizer import GPT2Tokenizer

    saved = GPT2Tokenizer.for_run(tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer" / "vocab.json").is_file()
    assert saved.encode("two small red squares") == tokenizer.encode("two small red squares")

    # The run folder is a model folder: Captioner.load gives back the trained weights.
    batch = next(iter(data.make_dataset(_request(config))))
    inputs = {"images": batch["images"], "token_ids": batch["token_ids"][:, :-1]}
    loaded = Captioner.load(tmp_path / "run")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(inputs)), keras.ops.convert_to_numpy(trainer.model(inputs)), atol=1e-5
    )
    assert Captioner.load(tmp_path / "run" / "best").captioner_config == config


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every scalar ``tag`` in a folder of TensorBoard event files."""
    import tensorflow as tf

    found = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    found.append((event.step, float(tf.make_ndarray(value.tensor))))
    return found


def _request(config: CaptionerConfig):
    from gpt2_effnet.training.data_source import DataRequest

    return DataRequest(epoch=0, batch_size=config.train.batch_size, num_shards=1, shard_index=0, seed=0, shuffle=False)


@pytest.mark.slow
def test_loss_falls_through_dali_on_cpu(tiny, synthetic, tmp_path: Path) -> None:
    from gpt2_effnet.data.dali import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI or its TensorFlow plugin does not import here")
    from gpt2_effnet.training.loop import Trainer
    from gpt2_effnet.training.sources import make_tokenizer, shard_source

    train_shards = [str(p) for p in synthetic.shards if Path(p).name.startswith("train-")]
    assert train_shards
    config = CaptionerConfig.from_dict(tiny).replace(train={"steps": 12, "precision": "mixed_bfloat16"})
    data = shard_source(config, make_tokenizer(config), train_shards, "dali")
    result = Trainer(config, tmp_path / "run", data, show_progress=False).fit()
    first, last = _first_and_last_loss(result.history)
    assert result.step == 12
    assert last < first - 2.0, (first, last)


def test_cli_builds_the_config_from_file_and_flags(tiny, tmp_path: Path) -> None:
    import argparse

    import yaml

    from gpt2_effnet.commands import train as cli

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tiny, "train": {**tiny["train"], "epochs": 3}}))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--csv", "x.csv", "--out", "r", "--steps", "7",
                              "--set", "train.precision=mixed_bfloat16", "--set", "optim.warmup_steps=2"])
    config = cli.build_config(args)
    assert (config.train.steps, config.train.epochs) == (7, None)
    assert config.train.precision == "mixed_bfloat16" and config.optim.warmup_steps == 2
    assert config.gpt2.n_embd == 32
    with pytest.raises(ConfigError, match="train.precison"):
        cli.build_config(parser.parse_args(["--config", str(path), "--csv", "x", "--out", "r", "--set", "train.precison=x"]))
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        cli.build_config(parser.parse_args(["--config", str(path), "--csv", "x", "--out", "r", "--set", "steps=3"]))
    with pytest.raises(SystemExit):  # one data source only
        parser.parse_args(["--config", str(path), "--csv", "x", "--coco", "y", "--out", "r"])


def test_shards_are_split_between_workers(tiny, synthetic) -> None:
    """What each worker of a multi-worker run reads: disjoint shares that together are everything."""
    from gpt2_effnet.training.data_source import DataRequest
    from gpt2_effnet.training.sources import caption_source, make_tokenizer

    config = CaptionerConfig.from_dict(tiny)
    data = caption_source(config, make_tokenizer(config), csv=synthetic.train_csv, training=False)
    seen = []
    for index in range(2):
        request = DataRequest(epoch=0, batch_size=64, num_shards=2, shard_index=index, seed=0, shuffle=False)
        batches = list(data.make_dataset(request))
        rows = [img.tobytes() + ids.tobytes() for b in batches for img, ids in zip(b["images"].numpy(), b["token_ids"].numpy())]
        assert len(rows) == len(set(rows)) == data.num_examples // 2
        seen.append(set(rows))
    assert not seen[0] & seen[1]


def test_train_command_names_missing_csv_columns(tiny, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import argparse

    import yaml

    from gpt2_effnet.commands import train as cli

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**tiny, "train": {**tiny["train"], "steps": 2}}))
    (tmp_path / "bad.csv").write_text("file,text\na.jpg,a cat\n")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--csv", str(tmp_path / "bad.csv"),
                              "--out", str(tmp_path / "run")])
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "'image'" in err and "['file', 'text']" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("vocabulary", [None, "kept"])
def test_head_on_target_positions_only_gives_the_full_heads_loss_and_gradients(tiny, rng, vocabulary) -> None:
    """The train step applies the LM head to real tokens only (and, with an output
    vocabulary, to its ids only): loss and every gradient must equal the plain full head's."""
    import tensorflow as tf

    from gpt2_effnet.captioner import Captioner
    from gpt2_effnet.training.steps import logits_at_targets
    from gpt2_effnet.training.loss import masked_cross_entropy_sum, next_token_split

    token_ids = rng.integers(0, 300, (3, 9)).astype(np.int32)
    mask = (np.arange(9)[None, :] < np.array([[9], [4], [6]])).astype(np.int32)
    kept = sorted(set(token_ids[mask.astype(bool)].tolist()) | {5, 299})
    config = CaptionerConfig.from_dict({**tiny, "gpt2": {**tiny["gpt2"], "vocab_size": 300},
                                        "model": {**tiny["model"], "backbone_drop_path": 0.0,  # no random drop-path: two passes must agree
                                                  "output_vocabulary": kept if vocabulary else None}})
    model = Captioner(config)
    images = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    inputs, targets, weights = next_token_split(token_ids, mask)
    variables = [v.value for v in model.trainable_variables]

    def loss_and_grads(gathered: bool):
        with tf.GradientTape() as tape:
            if gathered:
                logits, t, w = logits_at_targets(model, images, inputs, targets, weights)
            else:
                logits, t, w = model({"images": images, "token_ids": inputs}, training=True), targets, weights
            loss, _ = masked_cross_entropy_sum(logits, t, w)
        return float(loss), tape.gradient(loss, variables)

    full_loss, full_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for a, b in zip(grads, full_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(a).numpy(), tf.convert_to_tensor(b).numpy(), atol=1e-6, rtol=1e-4)
