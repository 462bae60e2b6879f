"""The serving graph of a token-classification export: words -> tags -> entities, all in TF ops.

`serving_default` takes raw texts, splits them on whitespace (keeping character offsets) and tags
every word; `serve_words` takes pre-split words ([batch, n] strings, "" padding). Both return, per
text: the words, their tags and tag scores, and the entities (type, word span, character span,
score). Each word is tokenized on its own, exactly as in training; its first word piece is read.
Texts longer than the backbone's position limit keep their first words and report how many words
got no tag (`truncated_words`); training-time windows are not needed here because serving uses the
backbone's full length.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kft.data import inputs
from kft.models.backbones import Packing


def tag_tables(names: list[str]) -> dict:
    """Per tag id: is it B-, is it I-, its entity type id (-1 for O); and the type names."""
    types = sorted({n[2:] for n in names if n[:2] in ("B-", "I-")})
    return {"is_begin": np.array([n.startswith("B-") for n in names]),
            "is_inside": np.array([n.startswith("I-") for n in names]),
            "type": np.array([types.index(n[2:]) if n[:2] in ("B-", "I-") else -1 for n in names], np.int32),
            "types": types}


def entities(tags: tf.Tensor, scores: tf.Tensor, mask: tf.Tensor, tables: dict) -> dict:
    """Entity spans of IOB2 tag ids [batch, words] (the CoNLL rules of `metrics.entity_spans`).

    Returns dense [batch, max entities] tensors (valid up to `entity_count`): type name, start and
    end word (end exclusive), mean tag score; and `entity_count` [batch].
    """
    batch, width = tf.shape(tags)[0], tf.shape(tags)[1]
    kind = tf.gather(tf.constant(tables["type"]), tags)
    is_begin = tf.gather(tf.constant(tables["is_begin"]), tags) & mask
    is_inside = tf.gather(tf.constant(tables["is_inside"]), tags) & mask
    previous = tf.concat([tf.fill([batch, 1], -1), kind[:, :-1]], axis=1)
    continues = is_inside & tf.equal(previous, kind)
    begins = is_begin | (is_inside & ~continues)
    member = begins | continues
    index = tf.cumsum(tf.cast(begins, tf.int32), axis=1) - 1  # entity number of each member word
    rows = tf.range(batch)[:, None] * width
    segment = tf.where(member, rows + index, batch * width)  # non-members go to a spare segment
    n = batch * width + 1
    position = tf.broadcast_to(tf.range(width)[None, :], tf.shape(tags))
    start = tf.math.unsorted_segment_min(position, segment, n)[:-1]
    end = tf.math.unsorted_segment_max(position, segment, n)[:-1] + 1
    size = tf.math.unsorted_segment_sum(tf.ones_like(position), segment, n)[:-1]
    total = tf.math.unsorted_segment_sum(scores, segment, n)[:-1]
    count = tf.reduce_sum(tf.cast(begins, tf.int32), axis=1)
    most = tf.reduce_max(tf.concat([count, [0]], axis=0))

    def table(x):
        return tf.reshape(x, [batch, width])[:, :most]

    start, end = table(start), table(end)
    valid = tf.range(most)[None, :] < count[:, None]
    first_kind = tf.gather(kind, tf.clip_by_value(start, 0, tf.maximum(width - 1, 0)), batch_dims=1)
    names = tf.gather(tf.constant(tables["types"] + [""]), tf.where(valid, first_kind, len(tables["types"])))
    score = table(total) / tf.cast(tf.maximum(table(size), 1), scores.dtype)
    return {"entity_count": count, "entity_type": names,
            "entity_start_word": tf.where(valid, start, 0), "entity_end_word": tf.where(valid, end, 0),
            "entity_score": tf.where(valid, score, 0.0)}


def tag_words(model, crf, tokenizer, packing: Packing, max_length: int, names: list[str],
              unknown_id: int, words: tf.RaggedTensor, char_start: tf.RaggedTensor,
              char_end: tf.RaggedTensor) -> dict:
    """Tags ragged words [batch, (words)] with the model; character offsets pass through to entities."""
    flat = words.flat_values
    pieces = tf.cast(tokenizer(flat), tf.int32)
    pieces = tf.RaggedTensor.from_row_splits(pieces.flat_values, pieces.row_splits)
    empty = tf.cast(tf.equal(pieces.row_lengths(), 0), tf.int64)  # a word without pieces reads [UNK]
    unknown = tf.RaggedTensor.from_row_lengths(tf.fill([tf.reduce_sum(empty)], unknown_id), empty)
    pieces = tf.concat([pieces, unknown], axis=1)
    first = tf.equal(tf.ragged.range(pieces.row_lengths()), 0)
    by_text = tf.RaggedTensor.from_row_splits(pieces, words.row_splits).merge_dims(1, 2)
    first = tf.RaggedTensor.from_row_splits(first, words.row_splits).merge_dims(1, 2)
    room = max_length - len(packing.start) - len(packing.end)
    first = first[:, :room]
    ids = inputs.pack(by_text, packing, max_length)
    token_ids = ids.to_tensor(default_value=packing.pad)
    token_ids = tf.pad(token_ids, [[0, 0], [0, tf.maximum(0, 1 - tf.shape(token_ids)[1])]],
                       constant_values=packing.pad)  # an empty batch still has one position
    padding_mask = tf.cast(tf.not_equal(tf.ones_like(ids).to_tensor(default_value=0), 0), tf.int32)
    padding_mask = tf.pad(padding_mask, [[0, 0], [0, tf.shape(token_ids)[1] - tf.shape(padding_mask)[1]]])
    outputs = model({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)
    # positions of the tagged (first) pieces, shifted past the start tokens
    where = tf.ragged.boolean_mask(tf.ragged.range(first.row_lengths()), first) + len(packing.start)
    per_word = tf.gather(outputs, tf.cast(where, tf.int32), batch_dims=1)  # [batch, (kept words), tags]
    kept = tf.cast(per_word.row_lengths(), tf.int32)
    dense = per_word.to_tensor()
    mask = tf.sequence_mask(kept, tf.shape(dense)[1])
    if crf is not None:
        tags, _ = crf.decode(dense, tf.cast(mask, tf.int32))
        probabilities = tf.nn.softmax(dense, axis=-1)
    else:
        probabilities = dense
        tags = tf.argmax(dense, axis=-1, output_type=tf.int32)
    tags = tf.cast(tags, tf.int32)
    scores = tf.gather(probabilities, tags, batch_dims=2)
    found = entities(tags, scores, mask, tag_tables(names))
    # entity character spans from the words' offsets
    starts = tf.cast(char_start.to_tensor(default_value=0), tf.int32)
    ends = tf.cast(char_end.to_tensor(default_value=0), tf.int32)
    valid = tf.range(tf.shape(found["entity_start_word"])[1])[None, :] < found["entity_count"][:, None]
    found["entity_start_char"] = tf.where(valid, tf.gather(starts, found["entity_start_word"],
                                                           batch_dims=1), 0)
    found["entity_end_char"] = tf.where(valid, tf.gather(ends, tf.maximum(found["entity_end_word"] - 1, 0),
                                                         batch_dims=1), 0)
    total = tf.cast(words.row_lengths(), tf.int32)
    width = tf.shape(words.to_tensor(default_value=""))[1]
    label = tf.where(mask, tf.gather(tf.constant(names), tags), "")
    pad = tf.maximum(0, width - tf.shape(label)[1])
    label = tf.pad(label, [[0, 0], [0, pad]], constant_values="")[:, :width]
    score = tf.pad(tf.where(mask, scores, 0.0), [[0, 0], [0, pad]])[:, :width]
    return {"words": words.to_tensor(default_value=""), "tags": label, "tag_scores": score,
            "truncated_words": total - kept, **found}


def joined_offsets(words: tf.RaggedTensor):
    """Character offsets of words in their texts joined by single spaces."""
    lengths = tf.strings.length(words.flat_values, unit="UTF8_CHAR")
    before = tf.cumsum(lengths + 1, exclusive=True)  # over all words of all texts
    base = tf.gather(before, words.row_splits[:-1])  # where each text starts in that count
    starts = before - tf.gather(base, words.value_rowids())
    return words.with_flat_values(starts), words.with_flat_values(starts + lengths)
