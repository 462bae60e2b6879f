"""AdamW with decoupled weight decay and a warmup-then-decay learning-rate schedule."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

# Variable names never decayed: biases, LayerNorm scale/offset.
NO_DECAY = ["bias", "gamma", "beta"]


@keras.saving.register_keras_serializable(package="kft")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak` over `warmup_steps`, then linear or cosine decay to 0."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, decay: str = "linear"):
        if decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"unknown decay {decay!r}")
        self.peak = float(peak)
        self.total_steps = int(max(1, total_steps))
        self.warmup_steps = int(max(0, min(warmup_steps, self.total_steps)))
        self.decay = decay

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = float(max(1, self.warmup_steps))
        warmup = self.peak * step / warm
        span = float(max(1, self.total_steps - self.warmup_steps))
        progress = keras.ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        if self.decay == "linear":
            after = self.peak * (1.0 - progress)
        elif self.decay == "cosine":
            after = self.peak * 0.5 * (1.0 + keras.ops.cos(math.pi * progress))
        else:
            after = self.peak + 0.0 * progress
        return keras.ops.where(step < self.warmup_steps, warmup, after)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "decay": self.decay}


class AdamW(keras.optimizers.AdamW):
    """AdamW whose global-norm clipping sees the gradient summed over all replicas.

    Keras' TensorFlow optimizer clips each replica's partial gradient before the cross-replica
    sum, so the same run on 1 and on 2 replicas would clip differently. This moves the clipping
    after the sum: every replica count then takes the same step.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._clip_after_reduce = keras.backend.backend() == "tensorflow" and bool(self.global_clipnorm)
        if self._clip_after_reduce and not hasattr(super(), "_all_reduce_sum_gradients"):
            raise RuntimeError("this Keras version has no _all_reduce_sum_gradients to clip after")

    def _clip_gradients(self, grads):
        return grads if self._clip_after_reduce else super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        reduced = super()._all_reduce_sum_gradients(grads_and_vars)
        if not self._clip_after_reduce:
            return reduced
        present = [g for g, _ in reduced if g is not None]
        clipped = iter(tf.clip_by_global_norm(present, self.global_clipnorm)[0])
        return [(next(clipped) if g is not None else None, v) for g, v in reduced]


def build_optimizer(config, total_steps: int) -> keras.optimizers.Optimizer:
    """AdamW from the run's flags; `total_steps` is the planned number of optimizer updates."""
    schedule = WarmupDecay(config.learning_rate, total_steps,
                           int(round(config.warmup_ratio * total_steps)), config.lr_schedule)
    optimizer = AdamW(
        learning_rate=schedule, weight_decay=config.weight_decay, beta_1=0.9, beta_2=0.999,
        epsilon=1e-6, global_clipnorm=config.clipnorm or None)
    optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer
