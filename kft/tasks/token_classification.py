"""Token classification (NER): backbone -> per-token Dense(num_tags) -> softmax, or a linear-chain CRF.

Labels live on word pieces: a word's first piece holds its tag id and every other position holds -1
(`kft.token_inputs.IGNORE`), which loss and metrics skip. The softmax head's loss is each example's
mean cross-entropy over its tagged positions. With a CRF the tagged positions are first gathered
into a left-aligned word sequence (the CRF models transitions between words, not pieces) and the
loss is the CRF's negative log-likelihood per word.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from kft import crf as crf_lib


def build_model(backbone: keras.Model, num_tags: int, dropout: float, use_crf: bool = False,
                tags: list[str] | None = None, seed: int | None = None) -> keras.Model:
    """Functional model: token_ids, padding_mask [batch, length] -> per-position tag probabilities
    (softmax head) or tag scores (CRF head; the CRF layer holds the transitions)."""
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
    feed = {"token_ids": token_ids, "padding_mask": padding_mask}
    if "segment_ids" in (backbone.input if isinstance(backbone.input, dict) else {}):
        feed["segment_ids"] = keras.ops.zeros_like(token_ids)
    for layer in backbone.layers:
        if layer.name == "pooled_dense":  # the pooler is not on a token head's path: no gradient
            layer.trainable = False
    outputs = backbone(feed)
    sequence = outputs["sequence_output"] if isinstance(outputs, dict) else outputs
    x = keras.layers.Dropout(dropout, seed=seed, name="head_dropout")(sequence)
    scores = keras.layers.Dense(num_tags, dtype="float32", name="tagger")(x)
    if use_crf:
        allowed, allowed_start = crf_lib.iob2_constraints(tags) if tags else (None, None)
        out = crf_lib.CRF(num_tags, allowed, allowed_start, name="crf")(scores)
    else:
        out = keras.layers.Softmax(dtype="float32", name="tag_probabilities")(scores)
    return keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, out, name="token_classifier")


def crf_layer(model: keras.Model):
    """The model's CRF layer, or None for a softmax head."""
    return next((layer for layer in model.layers if isinstance(layer, crf_lib.CRF)), None)


def gather_words(values, labels):
    """Moves the tagged positions (labels >= 0) of each row to the front, in order.

    Returns (values [batch, time, ...] reordered, labels reordered with -1 -> 0, word mask
    [batch, time]): the left-aligned word sequences a CRF works on.
    """
    tagged = labels >= 0
    time = ops.shape(labels)[1]
    position = ops.arange(time)[None, :]
    order = ops.argsort(ops.where(tagged, position, position + time), axis=1)
    index = order[..., None] if len(values.shape) == 3 else order
    moved = ops.take_along_axis(values, index, axis=1)
    words = ops.sum(ops.cast(tagged, "int32"), axis=1)
    mask = ops.cast(position < words[:, None], "int32")
    word_labels = ops.maximum(ops.take_along_axis(labels, order, axis=1), 0) * mask
    return moved, word_labels, mask


def loss_function(model: keras.Model):
    """fn(labels [batch, time], outputs [batch, time, tags]) -> loss per example [batch]."""
    crf = crf_layer(model)

    def softmax_loss(labels, probabilities):
        labels = ops.cast(labels, "int32")
        tagged = ops.cast(labels >= 0, "float32")
        ce = keras.losses.sparse_categorical_crossentropy(ops.maximum(labels, 0), probabilities)
        return ops.sum(ce * tagged, axis=1) / ops.maximum(ops.sum(tagged, axis=1), 1.0)

    def crf_loss(labels, scores):
        labels = ops.cast(labels, "int32")
        emissions, word_labels, mask = gather_words(scores, labels)
        words = ops.cast(ops.sum(mask, axis=1), "float32")
        return crf.negative_log_likelihood(emissions, word_labels, mask) / ops.maximum(words, 1.0)

    return crf_loss if crf is not None else softmax_loss


def predict_words(model: keras.Model, outputs: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Tag ids of the tagged positions of each row ([rows, time, tags] model outputs; `labels`
    marks the positions to read, >= 0): argmax for softmax, Viterbi for a CRF."""
    crf = crf_layer(model)
    if crf is None:
        best = outputs.argmax(-1)
        return [best[i][labels[i] >= 0] for i in range(len(outputs))]
    emissions, _, mask = gather_words(ops.convert_to_tensor(outputs), ops.convert_to_tensor(labels))
    tags = ops.convert_to_numpy(crf.decode(emissions, mask)[0])
    counts = (labels >= 0).sum(axis=1)
    return [tags[i, :counts[i]] for i in range(len(outputs))]
