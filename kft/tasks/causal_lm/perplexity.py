"""Perplexity of a decoder on plain text, packed as the causal_lm task packs it: the forgetting
measure `kft.training.drift` reports for decoders (it receives this module from the task)."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from kft.tasks.causal_lm import data as lm_data, inputs as lm_inputs, model as lm_model


@dataclasses.dataclass
class PlainTexts:
    """Texts packed as the causal_lm task packs plain text: [bos] text eos, every token after the
    first one a target (labels -1 elsewhere)."""

    ids: np.ndarray  # [n, longest] int32, right-padded
    lengths: np.ndarray  # [n]
    labels: np.ndarray  # [n, longest]: position t's target, the token at t + 1
    cut: int  # texts longer than the model's positions, cut at the end


def plain_texts(loaded, texts: list[str]) -> PlainTexts:
    """`texts` tokenized and packed by the causal_lm task's own code, as long as the longest one
    (up to the backbone's limit)."""
    split = lm_data.Examples("general_text", "general_text", [lm_data.Example([], t, i + 1) for i, t in
                                                            enumerate(texts)], "text")
    pieces = lm_inputs.tokenize(split, loaded, None, None, None, write=False)
    bos = 1 if loaded.bos_id is not None else 0
    # encode keeps one position spare beyond [bos] text eos
    length = min(loaded.max_sequence_length, max(len(c) for c in pieces[1]) + bos + 2)
    encoded = lm_inputs.encode(split, loaded, None, length, True, None, None, False, pieces)
    ids, lengths, labels, _ = lm_inputs.matrices(encoded, loaded.pad_id, train_on_prompt=True)
    return PlainTexts(ids, lengths, labels, encoded.completions_cut)


def perplexity(model: keras.Model, texts: PlainTexts, batch_size: int = 8) -> tuple[float, int]:
    """(exp of the mean next-token cross-entropy over every target in `texts`, target count).

    `model` returns hidden states (a decoder backbone, or the causal_lm task's model, prompt vectors
    included); the task's scoring path projects only the target positions onto the vocabulary, a
    few texts at a time, so no [batch, length, vocabulary] tensor of a large vocabulary is formed.
    """
    import tensorflow as tf

    predict = lm_model.predict_function(model)
    order = np.argsort(texts.lengths, kind="stable")  # similar lengths together: less padding
    total, count = 0.0, 0
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        width = int(texts.lengths[rows].max())
        mask = (np.arange(width)[None, :] < texts.lengths[rows][:, None]).astype(np.int32)
        labels = texts.labels[rows, :width]
        out = predict({"token_ids": tf.constant(texts.ids[rows, :width]), "padding_mask": tf.constant(mask)},
                      tf.constant(labels))
        total += float(np.sum(np.asarray(out[..., 0], np.float64)))
        count += int((labels >= 0).sum())
    return math.exp(total / max(count, 1)), count
