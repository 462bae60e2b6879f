"""The decoder as the training loop sees it, its loss on completion tokens, and batched generation.

The model returns the backbone's hidden states; the loss projects only the trained positions
through the (tied) output embedding. A completion is typically a fifth of a sequence, and the
vocabulary projection (576 x 49,152 for SmolLM2) is a quarter of a small model's compute, so
the logits of prompt positions are never formed.
"""

from __future__ import annotations

import keras
import keras_hub
import numpy as np
import tensorflow as tf


def build_model(backbone: keras.Model) -> keras.Model:
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    return keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, hidden, name="causal_lm")


def find_backbone(model: keras.Model) -> keras.Model:
    for layer in model.layers:
        if isinstance(layer, keras_hub.models.Backbone) or hasattr(layer, "token_embedding"):
            return layer
    raise ValueError(f"{model.name} holds no keras-hub backbone")


def _token_scores(embedding, hidden, labels):
    """(per-position cross-entropy [k], whether argmax is the target [k], where [k, 2]) at labels >= 0."""
    where = tf.where(labels >= 0)
    picked = tf.gather_nd(hidden, where)
    logits = tf.cast(embedding(picked, reverse=True), tf.float32)
    targets = tf.gather_nd(labels, where)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
    correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), targets), tf.float32)
    return ce, correct, where


def loss_function(model: keras.Model):
    """fn(labels [b, t], hidden [b, t, h]) -> summed cross-entropy of each example's trained tokens [b];
    the loop divides by the global batch's trained tokens (a per-token mean)."""
    embedding = find_backbone(model).token_embedding

    def loss(labels, hidden):
        ce, _, where = _token_scores(embedding, hidden, labels)
        return tf.math.unsorted_segment_sum(ce, where[:, 0], tf.shape(labels)[0])

    return loss


def predict_function(model: keras.Model):
    """fn(features, labels) -> [b, t, 2]: each trained position's cross-entropy and argmax hit."""
    embedding = find_backbone(model).token_embedding

    def predict(features, labels):
        hidden = model(features, training=False)
        ce, correct, where = _token_scores(embedding, hidden, labels)
        shape = tf.concat([tf.shape(labels, out_type=tf.int64), [2]], axis=0)
        return tf.scatter_nd(where, tf.stack([ce, correct], axis=-1), shape)

    return predict


class Generator:
    """Greedy generation with keras-hub's compiled, KV-cached `generate` for the current weights.

    Prompts of one batch are right-padded (keras-hub fills each row from its own length); batches are
    formed in length order and padded to a multiple of `width_step` with a fixed row count, so the
    compiled function is traced for a few shapes only.
    """

    def __init__(self, backbone: keras.Model, causal_lm_class: type, stop_ids: list[int], pad_id: int,
                 batch_size: int, width_step: int = 64):
        self.lm = causal_lm_class(backbone=backbone, preprocessor=None)
        self.lm.compile(sampler="greedy")
        self.stop_ids = list(stop_ids)
        # keras-hub's sampler stops a row once any position past its prompt holds a stop id, so the
        # free positions must not be filled with one (many checkpoints pad with EOS).
        self.pad_id = int(pad_id) if pad_id not in self.stop_ids else \
            next(i for i in range(len(self.stop_ids) + 1) if i not in self.stop_ids)
        self.batch_size, self.width_step = batch_size, width_step

    def __call__(self, prompts: list[np.ndarray], max_new_tokens: int, limit: int | None = None):
        """Generated ids of each prompt (stop token excluded) and whether it stopped before the cap."""
        order = np.argsort([len(p) for p in prompts], kind="stable")
        out, stopped = [None] * len(prompts), [False] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            longest = max(len(prompts[i]) for i in rows)
            width = -(-(longest + max_new_tokens) // self.width_step) * self.width_step
            if limit:
                width = min(width, limit)
            ids = np.full((self.batch_size, width), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, width), np.int32)
            for r, i in enumerate(rows):
                ids[r, :len(prompts[i])] = prompts[i]
                mask[r, :len(prompts[i])] = 1
            # Filler rows repeat a real one: a shorter filler would make every row decode from its length.
            ids[len(rows):], mask[len(rows):] = ids[0], mask[0]
            result = self.lm.generate({"token_ids": ids, "padding_mask": mask},
                                      stop_token_ids=self.stop_ids)
            tokens = np.asarray(result["token_ids"])
            for r, i in enumerate(rows):
                new = tokens[r, len(prompts[i]):len(prompts[i]) + max_new_tokens]
                hits = np.flatnonzero(np.isin(new, self.stop_ids))
                stopped[i] = bool(hits.size)
                out[i] = new[:hits[0]] if hits.size else new
        return out, stopped
