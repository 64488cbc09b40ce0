"""The compiled train and eval steps, built once per run and called by the loop (and benchmarks).

Each takes one distributed batch and returns ``(cross-entropy sum, correct tokens, tokens)``
over the global batch, as tensors: the loop reads them only at log lines. The train step
also takes this worker's *stop vote* (the number of a signal it received, or 0) and returns
the votes of all workers summed: every worker sees the same value after the same step, so
a SIGTERM to any one of them stops them all at one step (see the loop).

Gradients are exact whatever the split: each replica sums cross-entropy over its tokens
and divides by the number of real tokens in the *global* batch, micro-batches
(``grad_accum_steps``) add their gradients, and the replicas' sums are all-reduced once,
then clipped and applied. One device with batch B, R replicas with B/R each, or W workers
all compute the same update for the same examples.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Mapping

import keras
import tensorflow as tf

from ..captioner import Captioner
from ..config import OptimConfig, TrainConfig
from .loss import masked_correct_sum, masked_cross_entropy_sum, next_token_split
from .distribute import worker_info
from .optim import clip_gradients

StepOutputs = tuple[Any, ...]
Step = Callable[..., StepOutputs]


def build_train_step(
    model: Captioner,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
    train: TrainConfig,
    optim: OptimConfig,
) -> Step:
    """One optimizer update per call: gradients (accumulated over micro-batches), all-reduce, clip, apply."""
    variables = list(model.trainable_variables)
    # The tf.Variables behind Keras' variables. Watch only these: frozen Keras layers keep
    # tf.Variable(trainable=True) underneath, so an auto-watching tape would backpropagate
    # through a whole frozen backbone for nothing.
    watched = [v.value for v in variables]
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    replicas = strategy.num_replicas_in_sync
    several_workers = worker_info(strategy).num_workers > 1
    accum = train.grad_accum_steps
    # XLA needs static shapes, so under jit_compile the head runs on every position.
    gather_targets = not train.jit_compile

    def micro_batch_gradients(images: Any, token_ids: Any, mask: Any, denominator: Any) -> tuple[list[Any], Any, Any]:
        inputs, targets, weights = next_token_split(token_ids, mask)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(watched)
            if gather_targets:
                logits, targets, weights = logits_at_targets(model, images, inputs, targets, weights)
            else:
                logits = model({"images": images, "token_ids": inputs}, training=True)
            loss_sum, _ = masked_cross_entropy_sum(logits, targets, weights)
            loss = loss_sum / denominator
            if loss_scaled:
                loss = optimizer.scale_loss(loss)
        grads = tape.gradient(loss, watched)
        grads = [tf.zeros(v.shape, v.dtype) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
        correct, _ = masked_correct_sum(tf.stop_gradient(logits), targets, weights)
        return grads, loss_sum, correct

    def batch_gradients(batch: Mapping[str, Any], denominator: Any) -> tuple[list[Any], Any, Any]:
        images, token_ids, mask = batch["images"], batch["token_ids"], batch["mask"]
        if accum == 1:
            return micro_batch_gradients(images, token_ids, mask, denominator)
        parts = [split_micro_batches(t, accum) for t in (images, token_ids, mask)]
        summed = [tf.zeros(v.shape, v.dtype) for v in variables]
        loss_sum = correct = tf.constant(0.0)
        for i in tf.range(accum):
            grads, micro_loss, micro_correct = micro_batch_gradients(*(tf.gather(p, i) for p in parts), denominator)
            summed = [a + tf.cast(g, a.dtype) for a, g in zip(summed, grads)]
            loss_sum += micro_loss
            correct += micro_correct
        return summed, loss_sum, correct

    # Keras layers need no AutoGraph (they run on backends that have none), and converting
    # every layer's Python while tracing costs seconds; only the accumulation loop uses it.
    compiled_gradients = tf.function(
        batch_gradients, jit_compile=train.jit_compile, reduce_retracing=True, autograph=accum > 1
    )

    def replica_step(batch: Mapping[str, Any], stop_vote: Any) -> StepOutputs:
        context = tf.distribute.get_replica_context()
        tokens = tf.reduce_sum(tf.cast(batch["mask"][:, 1:], tf.float32))
        if replicas > 1:
            tokens = context.all_reduce(tf.distribute.ReduceOp.SUM, tokens)
        if several_workers:  # one process alone knows its own signals
            stop_vote = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(stop_vote))
        grads, loss_sum, correct = compiled_gradients(batch, tf.maximum(tokens, 1.0))
        if replicas > 1:
            grads = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            loss_sum, correct = context.all_reduce(tf.distribute.ReduceOp.SUM, [loss_sum, correct])
        scale = optimizer.dynamic_scale if loss_scaled else 1.0
        grads = clip_gradients(grads, optim.clipvalue, optim.global_clipnorm, scale=scale)
        optimizer.apply(grads, variables)
        return loss_sum, correct, tokens, stop_vote

    @tf.function(autograph=False)
    def compiled_step(distributed_batch: Any, stop_vote: Any) -> StepOutputs:
        outputs = strategy.run(replica_step, args=(distributed_batch, stop_vote))
        return tuple(strategy.experimental_local_results(x)[0] for x in outputs)

    def train_step(distributed_batch: Any, stop_vote: int = 0) -> StepOutputs:
        """(loss sum, correct, tokens, votes) of one update; ``votes`` counts, over all replicas
        of all workers, those whose worker received SIGINT and SIGTERM: ``[sigint, sigterm]``."""
        vote = [float(stop_vote == signal.SIGINT), float(stop_vote == signal.SIGTERM)]
        return compiled_step(distributed_batch, tf.constant(vote, tf.float32))

    return train_step


def build_eval_step(model: Captioner, strategy: tf.distribute.Strategy, jit_compile: bool = False) -> Step:
    """Loss and accuracy of one distributed batch, without dropout and without updates."""
    replicas = strategy.num_replicas_in_sync

    def forward(batch: Mapping[str, Any]) -> StepOutputs:
        inputs, targets, weights = next_token_split(batch["token_ids"], batch["mask"])
        logits = model({"images": batch["images"], "token_ids": inputs}, training=False)
        loss_sum, tokens = masked_cross_entropy_sum(logits, targets, weights)
        correct, _ = masked_correct_sum(logits, targets, weights)
        return loss_sum, correct, tokens

    compiled_forward = tf.function(forward, jit_compile=jit_compile, reduce_retracing=True, autograph=False)

    def replica_eval(batch: Mapping[str, Any]) -> StepOutputs:
        values = compiled_forward(batch)
        if replicas > 1:
            values = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, list(values))
        return tuple(values)

    @tf.function(autograph=False)
    def eval_step(distributed_batch: Any) -> StepOutputs:
        outputs = strategy.run(replica_eval, args=(distributed_batch,))
        return tuple(strategy.experimental_local_results(x)[0] for x in outputs)

    return eval_step


def logits_at_targets(model: Captioner, images: Any, inputs: Any, targets: Any, weights: Any) -> tuple[Any, Any, Any]:
    """Logits ``[N, V]`` for the N positions that have a target, with their targets and weights.

    The LM head over GPT-2's 50k-token vocabulary is the largest matmul of a small captioner,
    and padding positions (often half of a batch of captions) need none of it: the hidden
    states are gathered first, so the head, the softmax and their gradients cover only
    the real tokens. Same loss and gradients as the full head, less work. With a
    restricted output vocabulary the logits stay compact and the targets are mapped to
    their columns (the loss is the same as over all V, where excluded ids add exp(-1e9) = 0).
    """
    hidden = model.hidden_states({"images": images, "token_ids": inputs}, training=True)
    where = tf.where(weights > 0)
    # expand_dims/squeeze, not [tf.newaxis]/[0]: the gradient of an index is a StridedSliceGrad
    # that writes the whole [N, V] logits gradient once more (~4 ms of a seed-config step).
    logits = tf.squeeze(model.decoder.head(tf.expand_dims(tf.gather_nd(hidden, where), 0), compact=True), 0)
    targets = model.decoder.compact_targets(tf.gather_nd(targets, where))
    return logits, targets, tf.gather_nd(weights, where)


def split_micro_batches(tensor: Any, parts: int) -> Any:
    """``[B, ...]`` -> ``[parts, B/parts, ...]``, zero-padding B up to a multiple of ``parts``.

    Padded rows have mask 0, so they add nothing to loss or gradients; they only appear
    when a final batch is short.
    """
    batch = tf.shape(tensor)[0]
    static = tensor.shape[0]
    if static is None or static % parts:
        pad = (-batch) % parts
        paddings = tf.concat(
            [tf.reshape(tf.stack([0, pad]), [1, 2]), tf.zeros([tf.rank(tensor) - 1, 2], tf.int32)], axis=0
        )
        tensor = tf.pad(tensor, paddings)
        batch = batch + pad
    rest = tf.shape(tensor)[1:]
    return tf.reshape(tensor, tf.concat([[parts, batch // parts], rest], axis=0))
