"""Adam with the seed's settings, a warmup + cosine schedule, and clipping done by the loop.

The seed clipped by value *and* by global norm; Keras 3 optimizers accept only one of the
two, and under ``tf.distribute`` they clip each replica's gradients before summing them,
which makes a "global" norm depend on the number of devices. So the loop sums the
gradients over replicas itself, clips the sum with :func:`clip_gradients`, and hands the
result to an Adam that does not sum again (:class:`SummedGradientAdam`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import keras
from keras import ops

from ..config import OptimConfig


@keras.saving.register_keras_serializable("gpt2_effnet")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to ``peak`` over ``warmup_steps``, then a cosine down to ``peak * min_ratio``.

    Step ``s`` (0-based, the optimizer's iteration count) gets ``peak * (s + 1) / warmup_steps``
    during warmup, so the very first update is not wasted at a learning rate of zero.
    """

    def __init__(self, peak: float, warmup_steps: int, decay_steps: int, min_ratio: float = 0.0) -> None:
        super().__init__()
        if decay_steps <= warmup_steps:
            raise ValueError(f"decay_steps ({decay_steps}) must exceed warmup_steps ({warmup_steps})")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        peak = ops.cast(self.peak, "float32")
        warm = peak * (step + 1.0) / max(self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / (self.decay_steps - self.warmup_steps), 0.0, 1.0)
        floor = peak * self.min_ratio
        cosine = floor + (peak - floor) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warm, cosine)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "min_ratio": self.min_ratio,
        }


def learning_rate(cfg: OptimConfig, total_steps: int | None) -> float | WarmupCosine:
    """The config's learning rate: a float, or a :class:`WarmupCosine` over the run's length."""
    if cfg.schedule == "constant":
        if cfg.warmup_steps:
            # Warmup then hold: a cosine whose decay never starts.
            return WarmupCosine(cfg.learning_rate, cfg.warmup_steps, 2**62, min_ratio=1.0)
        return cfg.learning_rate
    decay_steps = cfg.decay_steps or total_steps
    if decay_steps is None:
        raise ValueError(
            "optim.schedule 'cosine' needs the run's length: set optim.decay_steps or train.steps "
            "(an --epochs run over data of unknown size has no step count to decay over)"
        )
    if decay_steps <= cfg.warmup_steps:
        raise ValueError(
            f"the cosine decays over {decay_steps} steps, which is not more than optim.warmup_steps "
            f"({cfg.warmup_steps}); lengthen the run or shorten the warmup"
        )
    return WarmupCosine(cfg.learning_rate, cfg.warmup_steps, decay_steps, cfg.min_learning_rate_ratio)


class SummedGradientAdam(keras.optimizers.Adam):
    """Adam that trusts its gradients to be summed over replicas already (by the loop).

    Keras' TensorFlow optimizer all-reduces in ``_all_reduce_sum_gradients``; the loop does
    that earlier (to clip the true global gradient), so here it is the identity.
    """

    def _all_reduce_sum_gradients(self, grads_and_vars: Any) -> Any:
        return list(grads_and_vars)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Keras' Adam update as one fused TensorFlow kernel per variable.

        Keras writes the update as ~25 small operations per variable, each a pass over it;
        TensorFlow's ``ApplyAdam`` computes the same formula (m and v updated in place,
        ``var -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``) in one, which
        took a quarter off the optimizer's time in the demo's step. Equal to Keras' Adam
        to float rounding (tested); AMSGrad keeps Keras' own code.
        """
        if self.amsgrad or keras.backend.backend() != "tensorflow":
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        index = self._get_variable_index(variable)
        target = variable.value if isinstance(variable, keras.Variable) else variable
        m, v = (slot.value for slot in (self._momentums[index], self._velocities[index]))
        dtype = target.dtype
        scalars = self._step_scalars.get(dtype) if self._step_scalars is not None else None
        if scalars is None:
            step = tf.cast(self.iterations + 1, dtype)
            beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
            scalars = dict(beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
                           lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                           epsilon=tf.cast(self.epsilon, dtype))
            if self._step_scalars is not None:
                self._step_scalars[dtype] = scalars
        tf.raw_ops.ResourceApplyAdam(var=target.handle, m=m.handle, v=v.handle, grad=tf.cast(gradient, dtype), **scalars)
        return None

    _step_scalars: dict[Any, dict[str, Any]] | None = None

    def _backend_update_step(self, grads: Any, trainable_variables: Any, learning_rate: Any) -> Any:
        # The step's scalars (bias corrections, learning rate) once per update, not once per
        # variable: ~6 scalar ops x ~100 variables were a visible share of a small model's step.
        self._step_scalars = {}
        try:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self._step_scalars = None


def build_optimizer(cfg: OptimConfig, total_steps: int | None, precision: str = "float32") -> keras.optimizers.Optimizer:
    """Adam per the config; wrapped in a dynamic ``LossScaleOptimizer`` for ``mixed_float16``.

    Clipping is *not* set on the optimizer: see :func:`clip_gradients`.
    """
    if keras.backend.backend() == "tensorflow" and not hasattr(keras.optimizers.Adam, "_all_reduce_sum_gradients"):
        raise RuntimeError(
            "this Keras version no longer has Optimizer._all_reduce_sum_gradients; "
            "SummedGradientAdam needs updating before distributed training is correct"
        )
    optimizer: keras.optimizers.Optimizer = SummedGradientAdam(
        learning_rate=learning_rate(cfg, total_steps),
        beta_1=cfg.beta_1,
        beta_2=cfg.beta_2,
        epsilon=cfg.epsilon,
        weight_decay=cfg.weight_decay or None,
    )
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=cfg.loss_scale)
    return optimizer


def clip_gradients(
    grads: Sequence[Any], clipvalue: float | None, global_clipnorm: float | None, scale: Any = 1.0
) -> list[Any]:
    """Clip each value to ``±clipvalue``, then the whole set to global norm ``global_clipnorm``.

    ``scale`` is the loss scale the gradients still carry (fp16): both clips commute with a
    positive scale when their thresholds are scaled too, so clipping scaled gradients against
    scaled thresholds equals clipping the true gradients. Non-finite gradients stay
    non-finite, so the loss-scale optimizer still sees them and skips the step.
    """
    import tensorflow as tf

    grads = [tf.convert_to_tensor(g) for g in grads]
    # Thresholds are cast once per dtype, not once per variable: with ~100 variables the
    # per-variable casts, squares and sums were ~1000 small ops of a train step.
    dtypes = {g.dtype for g in grads}
    if clipvalue is not None:
        limit = tf.cast(clipvalue, tf.float32) * scale
        upper = {dtype: tf.cast(limit, dtype) for dtype in dtypes}
        lower = {dtype: -value for dtype, value in upper.items()}
        grads = [tf.minimum(tf.maximum(g, lower[g.dtype]), upper[g.dtype]) for g in grads]
    if global_clipnorm is not None:
        # l2_loss is sum(g ** 2) / 2 as one op.
        norm = tf.sqrt(2.0 * tf.add_n([tf.cast(tf.nn.l2_loss(g), tf.float32) for g in grads]))
        limit = tf.cast(global_clipnorm, tf.float32) * scale
        factor = limit / tf.maximum(norm, limit)  # 1 when within the limit; NaN/inf norm stays non-finite
        factor = tf.where(tf.math.is_finite(norm), factor, norm)
        factors = {dtype: tf.cast(factor, dtype) for dtype in dtypes}
        grads = [g * factors[g.dtype] for g in grads]
    return grads
