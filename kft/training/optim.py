"""AdamW with decoupled weight decay, a warmup-then-decay schedule, and each method's learning rate."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from kft.config import FlagError

# Variable names never decayed: biases, LayerNorm scale/offset.
NO_DECAY = ["bias", "gamma", "beta"]

# Peak learning rates used when --learning_rate is 0 (its default), by (task, method); task None is
# the fallback for tasks without their own entry. One rate cannot serve every method: the
# parameter-efficient ones train few weights, most of them new, and need steps 60 to 600 times
# larger than full fine-tuning (at 5e-5, LoRA scores at chance on SST-2). The classification
# values were measured on SST-2 with the bundled MiniLM (README, "Tuning methods on SST-2").
# "head_only" is --freeze_layers=-1: only the new, randomly initialised head trains.
# kft/config.py's --learning_rate help lists these values; tests/test_training.py keeps them equal.
LEARNING_RATES = {
    (None, "full"): 5e-5,
    (None, "freeze"): 5e-5,
    (None, "head_only"): 1e-2,
    (None, "lora"): 3e-3,
    (None, "prompt"): 3e-2,
    (None, "prefix"): 2e-2,
    (None, "bitfit"): 3e-3,
    ("causal_lm", "full"): 2e-5,
    ("causal_lm", "freeze"): 2e-5,
    ("causal_lm", "lora"): 2e-4,
    ("causal_lm", "prompt"): 3e-2,
}


def format_rate(rate: float) -> str:
    """3e-3, 5e-5, 2.5e-4: how rates are written in flags and the README."""
    if rate == 0 or rate >= 0.1:
        return f"{rate:g}"
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def default_learning_rate(config) -> tuple[float, str]:
    """The table's peak learning rate for the run's task and method, and a reason for the log."""
    method = config.method
    variant = method
    if method in ("full", "freeze") and config.freeze_layers:
        # A nonzero --freeze_layers selects freeze even under --method=full (kft/methods/freeze.py).
        method = variant = "freeze"
        if config.freeze_layers == -1:
            variant = "head_only"
    task = config.task
    for key in ((task, variant), (task, method), (None, variant), (None, method)):
        if key in LEARNING_RATES:
            break
    else:
        raise FlagError(f"--learning_rate=0 (the method's default) but kft has no default for "
                        f"--method={config.method}; give --learning_rate")
    reason = f"--method={config.method}"
    if variant == "head_only":
        reason += " --freeze_layers=-1"
    if key[0] is not None:
        reason = f"--task={task} {reason}"
    return LEARNING_RATES[key], f"default for {reason}"


def peak_learning_rate(config) -> tuple[float, str]:
    """The peak learning rate the run trains with, and where it comes from.

    An explicit --learning_rate always wins; 0 (the default) means the method's default from
    LEARNING_RATES. Negative values are refused.
    """
    rate = config.learning_rate
    if not rate >= 0:  # also NaN
        raise FlagError(f"--learning_rate={rate}: must be positive, or 0 for the method's default")
    if rate > 0:
        return float(rate), "--learning_rate"
    return default_learning_rate(config)


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


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


class AdamW(keras.optimizers.AdamW):
    """AdamW with clipping after the cross-replica sum and a fused update on TensorFlow.

    Clipping: Keras' TensorFlow optimizer clips each replica's partial gradient before the
    cross-replica sum, so the same run on 1 and on 2 replicas would clip differently. This moves
    the clipping after the sum: every replica count then takes the same step.

    Fused update: Keras' Adam updates each variable with about ten element-wise ops, each a pass
    over memory; on CPU those passes over MiniLM's 22.7M parameters took a third of the train
    step. TensorFlow's `ResourceApplyAdam` kernel does the same arithmetic in one pass.
    """

    def __init__(self, *args, fused: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        on_tf = keras.backend.backend() == "tensorflow"
        self._fused = on_tf and fused and not self.amsgrad
        self._clip_after_reduce = on_tf and bool(self.global_clipnorm)
        if self._clip_after_reduce and not hasattr(super(), "_all_reduce_sum_gradients"):
            raise RuntimeError("this Keras version has no _all_reduce_sum_gradients to clip after")

    def update_step(self, gradient, variable, learning_rate):
        if not self._fused:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        # The same formula as keras.optimizers.Adam: bias corrections folded into the step size.
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_tf_variable(variable).handle,
            m=_tf_variable(self._momentums[index]).handle,
            v=_tf_variable(self._velocities[index]).handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(tf.convert_to_tensor(gradient), dtype))

    def anchor(self, pairs, weight: float) -> int:
        """L2-SP (Li et al., 2018) as a decoupled decay: each given variable decays toward its
        starting value, v -= lr * weight * (v - v0), instead of toward 0. Returns how many."""
        self._anchors = {}
        with tf.init_scope():
            for variable, value in pairs:
                if variable.trainable:
                    self._anchors[id(variable)] = tf.Variable(value, trainable=False, name="l2sp_anchor")
        self._anchor_weight = float(weight)
        return len(self._anchors)

    def _apply_weight_decay(self, variables):
        anchors = getattr(self, "_anchors", None)
        if anchors:
            return self._apply_anchored_decay(variables, anchors)
        if not self._fused or self.weight_decay is None:
            return super()._apply_weight_decay(variables)

        # Keras computes variable * wd * lr: two full-size products. One scalar, one product here.
        def decay(variable):
            if self._use_weight_decay(variable):
                scale = tf.cast(self.learning_rate * self.weight_decay, variable.dtype)
                variable.assign_sub(variable * scale)

        def apply(distribution, variables):
            for variable in variables:
                distribution.extended.update(_tf_variable(variable), decay, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(apply, self._distribution_strategy, variables)

    def _apply_anchored_decay(self, variables, anchors):
        def decay(variable, anchor=None):
            if anchor is not None:
                scale = tf.cast(self.learning_rate * self._anchor_weight, variable.dtype)
                variable.assign_sub((variable - anchor) * scale)
            elif self.weight_decay is not None and self._use_weight_decay(variable):
                variable.assign_sub(variable * tf.cast(self.learning_rate * self.weight_decay, variable.dtype))

        def apply(distribution, variables):
            for variable in variables:
                anchor = anchors.get(id(variable))
                distribution.extended.update(_tf_variable(variable), decay,
                                             args=(() if anchor is None else (anchor,)), group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(apply, self._distribution_strategy, variables)

    def _clip_gradients(self, grads):
        return grads if self._clip_after_reduce else super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        reduced = super()._all_reduce_sum_gradients(grads_and_vars)
        if self._clip_after_reduce:
            # An embedding lookup's gradient is IndexedSlices with a row per token occurrence;
            # tf.clip_by_global_norm would square the rows before summing a repeated token's and
            # get the wrong norm. With each row once, the norm is right and clipping scales only
            # the rows the batch touched (not the whole [vocabulary, hidden] table).
            reduced = [(_rows_once(g) if isinstance(g, tf.IndexedSlices) else g, v) for g, v in reduced]
            present = [g for g, _ in reduced if g is not None]
            clipped = iter(tf.clip_by_global_norm(present, self.global_clipnorm)[0])
            reduced = [(next(clipped) if g is not None else None, v) for g, v in reduced]
        # Adam moves every row (its moments decay), so the update takes dense gradients.
        return [(tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g, v) for g, v in reduced]


def _rows_once(gradient: tf.IndexedSlices) -> tf.IndexedSlices:
    """The same gradient with each row index once, the values of repeated indices summed."""
    rows, position = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, position, tf.size(rows))
    return tf.IndexedSlices(values, rows, gradient.dense_shape)


def build_optimizer(config, total_steps: int) -> keras.optimizers.Optimizer:
    """AdamW from the run's flags; `total_steps` is the planned number of optimizer updates."""
    schedule = WarmupDecay(peak_learning_rate(config)[0], total_steps,
                           int(round(config.warmup_ratio * total_steps)), config.lr_schedule)
    optimizer = AdamW(
        learning_rate=schedule, weight_decay=config.weight_decay, beta_1=0.9, beta_2=0.999,
        epsilon=1e-6, global_clipnorm=config.clipnorm or None)
    optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
    return optimizer
