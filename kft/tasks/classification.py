"""Text classification: backbone -> pooled text vector -> dropout -> Dense(num_classes, softmax)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kft import metrics


def _pool(outputs, padding_mask, pooling: str):
    """One vector per text from the backbone's outputs."""
    if isinstance(outputs, dict):
        sequence = outputs.get("sequence_output")
        pooled = outputs.get("pooled_output")
    else:
        sequence, pooled = outputs, None
    if pooling == "auto":
        pooling = "pooled" if pooled is not None else "cls"
    if pooling == "pooled":
        if pooled is None:
            raise ValueError("--pooling=pooled: this backbone has no pooled output; use cls or mean")
        return pooled
    if pooling == "cls":
        return sequence[:, 0, :]
    mask = keras.ops.expand_dims(keras.ops.cast(padding_mask, sequence.dtype), -1)
    return keras.ops.sum(sequence * mask, axis=1) / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)


def build_model(backbone: keras.Model, num_classes: int, dropout: float, pooling: str = "auto",
                seed: int | None = None) -> keras.Model:
    """Functional model taking token_ids and padding_mask ([batch, length] int32)."""
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
    feed = {"token_ids": token_ids, "padding_mask": padding_mask}
    backbone_inputs = backbone.input if isinstance(backbone.input, dict) else {}
    if "segment_ids" in backbone_inputs:
        feed["segment_ids"] = keras.ops.zeros_like(token_ids)
    pooled = _pool(backbone(feed), padding_mask, pooling)
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(pooled)
    # The head computes in float32 so softmax stays accurate under mixed precision.
    probabilities = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                       name="classifier")(x)
    return keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, probabilities,
                       name="text_classifier")


def per_example_loss(labels, probabilities):
    """Cross-entropy of each example ([batch]); the loop weights and sums it."""
    return keras.losses.sparse_categorical_crossentropy(labels, probabilities)


def evaluate(probabilities: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Accuracy, macro P/R/F1, per-class report and confusion matrix."""
    return metrics.classification_report(labels, probabilities.argmax(-1), names)


def serving_outputs(probabilities: tf.Tensor, names: list[str]) -> dict[str, tf.Tensor]:
    """What the exported signatures return for a batch of class probabilities."""
    class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    return {"probabilities": probabilities, "class_id": class_id,
            "label": tf.gather(tf.constant(names), class_id)}
