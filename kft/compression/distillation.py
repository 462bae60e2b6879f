"""Knowledge distillation from a finished kft run (`--teacher=RUN_DIR`) into the run being trained.

The loss (Hinton et al., 2015) per example, or per tagged word for token classification:
    alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * task loss,
where z are logits. kft's heads output probabilities; log-probabilities are logits up to a
per-example constant, which softmax ignores, so z = log p. T^2 keeps the soft term's gradient on
the scale of the hard term's as T grows. The teacher's log-probabilities for every training
example are computed once before training and cached in <model_dir>/teacher_outputs.npz: a step
costs what a plain training step costs.

Keras' `LogitsDistillation` default loss skips the softmax and T^2 (3.12-3.15.1), and it runs the
teacher every step; kft writes the loss here instead.
"""

from __future__ import annotations

import hashlib
import io
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras import ops

from kft import config as config_lib
from kft.data import inputs
from kft.training import runs
from kft.training import loop as loop_lib
from kft.config import Config, FlagError

CACHE = "teacher_outputs.npz"


Teacher = runs.Run  # a finished run rebuilt in memory with its final weights


def load_teacher(path: str, config: Config) -> Teacher:
    """Rebuilds the run at `path` (same backbone, method and head) with its final weights."""
    teacher_config, _ = runs.read_config(path, "--teacher")
    if teacher_config.task != config.task:
        raise FlagError(f"--teacher={path} was trained for --task={teacher_config.task}; this run is "
                        f"--task={config.task}")
    if teacher_config.crf or config.crf:
        raise FlagError("--teacher: distillation needs per-tag probabilities; a --crf head has none")
    return runs.load_run(path, "--teacher")


def check_labels(teacher: Teacher, names: list[str]) -> None:
    if list(names) != teacher.names:
        raise FlagError(f"--teacher={teacher.path} predicts labels {teacher.names}; this run's data has "
                        f"{list(names)} (the same labels, in the same order, are needed)")


def predict_log_probabilities(model: keras.Model, split, config: Config, counter: list | None = None):
    """log p of every example of a loop Feed in its order: [n, k] or [n, longest, k] (zeros past
    each example's length). One forward pass per eval batch; `counter` counts them."""
    plan = inputs.eval_plan(split.lengths, config.eval_batch_size or 4 * config.batch_size,
                            config.num_buckets, False)
    dataset = inputs.plan_dataset(plan, split.matrix, split.lengths, split.labels, split.weights)

    @tf.function
    def forward(features):
        return tf.math.log(tf.maximum(tf.cast(model(features, training=False), tf.float32), 1e-30))

    def batches():
        for features, _, _ in dataset:
            if counter is not None:
                counter.append(1)
            yield forward(features).numpy()

    return loop_lib.in_split_order(split, plan, batches())


def teacher_source(teacher: Teacher, config: Config, train, data, loaded):
    """The training split as the teacher reads it: the run's own token ids when both tokenize
    alike, else (classification) the training texts tokenized by the teacher's tokenizer."""
    from kft.data import token_cache

    same = token_cache.tokenizer_fingerprint(teacher.loaded.tokenizer) == \
        token_cache.tokenizer_fingerprint(loaded.tokenizer) and teacher.loaded.packing == loaded.packing
    if same:
        return train
    if config.task != "classification":
        raise FlagError(f"--teacher={teacher.path} tokenizes differently from --backbone={config.backbone}; "
                        f"--task={config.task} aligns the teacher's outputs by word piece, so the student "
                        "needs the teacher's tokenizer (e.g. --student_layers)")
    encoded = inputs.encode(teacher.loaded.tokenizer, teacher.loaded.packing, data.train.texts,
                            teacher.sequence_length)
    return loop_lib.Feed.from_encoded(encoded, train.labels, teacher.loaded.packing.pad)


def _fingerprint(teacher: Teacher, split) -> str:
    h = hashlib.sha256()
    h.update(teacher.checkpoint.encode())
    h.update(np.asarray(split.matrix).tobytes())
    h.update(np.asarray(split.lengths).tobytes())
    return h.hexdigest()


def teacher_outputs(teacher: Teacher, split, config: Config, model_dir: str, counter: list | None = None):
    """The teacher's log-probabilities for every training example, computed once and cached."""
    path = os.path.join(model_dir, CACHE)
    key = _fingerprint(teacher, split)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, "rb") as f:
            cached = np.load(io.BytesIO(f.read()))
        if str(cached["key"]) == key:
            logging.info("teacher outputs: read from %s", path)
            return cached["log_probabilities"]
    logging.info("teacher outputs: predicting %d training examples once ...", len(split.lengths))
    values = predict_log_probabilities(teacher.model, split, config, counter=counter)
    buffer = io.BytesIO()  # np.savez seeks; a GFile (gs://) does not
    np.savez(buffer, key=key, log_probabilities=values)
    with tf.io.gfile.GFile(path + ".tmp", "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)
    return values


def soft_cross_entropy(teacher_log_p, student_p, temperature: float):
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) over the last axis, z = log p."""
    t = ops.log_softmax(teacher_log_p / temperature, axis=-1)
    s = ops.log_softmax(ops.log(ops.maximum(ops.cast(student_p, "float32"), 1e-30)) / temperature, axis=-1)
    return temperature ** 2 * ops.sum(ops.exp(t) * (t - s), axis=-1)


def loss_function(task_loss, alpha: float, temperature: float, per_position: bool):
    """Wraps a task's per-example loss: labels arrive as (labels, teacher log-probabilities)."""

    def loss(labels, probabilities):
        hard, teacher = labels
        kl = soft_cross_entropy(teacher, probabilities, temperature)
        if per_position:  # summed over tagged words, as the task loss is
            kl = ops.sum(kl * ops.cast(ops.cast(hard, "int32") >= 0, "float32"), axis=1)
        return alpha * kl + (1.0 - alpha) * task_loss(hard, probabilities)

    return loss


def check_flags(config: Config) -> None:
    if not 0.0 <= config.distill_alpha <= 1.0:
        raise FlagError(f"--distill_alpha={config.distill_alpha}: must be in [0, 1]")
    if config.distill_temperature <= 0:
        raise FlagError(f"--distill_temperature={config.distill_temperature}: must be positive")
    if not config.teacher:
        for name in ("distill_alpha", "distill_temperature"):
            f = next(f for f in config_lib.fields() if f.name == name)
            if getattr(config, name) != config_lib.default(f):
                raise FlagError(f"--{name} applies with --teacher only")
