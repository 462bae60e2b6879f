"""Tokenize once, then feed length-grouped, per-batch padded batches.

Texts are tokenized a single time into ragged token ids (with the backbone's start/end tokens);
epochs reuse those ids. Training batches group examples of similar length (buckets whose boundaries
come from the data) and pad each batch only to its own longest example. Evaluation sorts by length
and keeps the permutation so predictions line up with the source order.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from kft.backbones import Packing

_CHUNK = 4096  # texts per tokenizer call: bounds peak memory on long documents


@dataclasses.dataclass
class Encoded:
    """Token ids of one split, unpadded."""

    ids: tf.RaggedTensor  # [n, (length)] int32, special tokens included
    lengths: np.ndarray  # [n] tokens per example after truncation
    truncated: int  # examples cut to fit sequence_length

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


def _graph_tokenizer(tokenizer):
    """The tokenizer as a graph function: returns ragged ids (eager calls would give Python lists)."""
    return tf.function(lambda texts: tokenizer(texts),
                       input_signature=[tf.TensorSpec([None], tf.string)])


def raw_token_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Word-piece counts of texts, without special tokens or truncation."""
    out = []
    tokenize = _graph_tokenizer(tokenizer)
    for i in range(0, len(texts), _CHUNK):
        pieces = tokenize(tf.constant(texts[i:i + _CHUNK]))
        out.append(pieces.row_lengths().numpy())
    return np.concatenate(out) if out else np.zeros([0], np.int64)


def choose_sequence_length(raw_lengths: np.ndarray, packing: Packing, limit: int,
                           percentile: float = 99.0) -> int:
    """A cap covering `percentile`% of the training texts, rounded up to 8, at most `limit`."""
    specials = len(packing.start) + len(packing.end)
    cap = int(np.ceil(np.percentile(raw_lengths, percentile))) + specials
    cap = int(np.ceil(cap / 8) * 8)
    return max(8, min(cap, limit))


def pack(pieces: tf.RaggedTensor, packing: Packing, sequence_length: int) -> tf.RaggedTensor:
    """[start] + pieces[:room] + [end] for each row; works in eager mode and inside graphs."""
    room = sequence_length - len(packing.start) - len(packing.end)
    pieces = tf.cast(pieces[:, :room], tf.int32)
    batch = pieces.nrows()
    parts = []
    if packing.start:
        parts.append(tf.RaggedTensor.from_tensor(tf.tile(tf.constant([packing.start], tf.int32), [batch, 1])))
    parts.append(pieces)
    if packing.end:
        parts.append(tf.RaggedTensor.from_tensor(tf.tile(tf.constant([packing.end], tf.int32), [batch, 1])))
    return tf.concat(parts, axis=1)


def encode(tokenizer, packing: Packing, texts: list[str], sequence_length: int) -> Encoded:
    """Tokenizes every text once; counts the ones longer than `sequence_length`."""
    room = sequence_length - len(packing.start) - len(packing.end)
    chunks, truncated = [], 0
    tokenize = _graph_tokenizer(tokenizer)
    for i in range(0, len(texts), _CHUNK):
        pieces = tokenize(tf.constant(texts[i:i + _CHUNK]))
        truncated += int(tf.reduce_sum(tf.cast(pieces.row_lengths() > room, tf.int32)))
        chunks.append(pack(pieces, packing, sequence_length))
    ids = tf.concat(chunks, axis=0) if len(chunks) > 1 else chunks[0]
    return Encoded(ids, ids.row_lengths().numpy(), truncated)


def bucket_boundaries(lengths: np.ndarray, num_buckets: int) -> list[int]:
    """Upper bounds (exclusive) splitting the length distribution into ~equal-count buckets."""
    if num_buckets <= 1:
        return []
    qs = np.percentile(lengths, np.linspace(0, 100, num_buckets + 1)[1:-1])
    return sorted({int(q) + 1 for q in qs if q + 1 <= lengths.max()})


def _features(ids, mask):
    return {"token_ids": ids, "padding_mask": mask}


def train_dataset(encoded: Encoded, labels: np.ndarray, batch_size: int, seed: int,
                  num_buckets: int, pad_value: int, static_shapes: bool = False) -> tf.data.Dataset:
    """Shuffled (reshuffled each epoch, seeded), length-bucketed, per-batch padded batches.

    With `static_shapes` (TPU, XLA) batches pad to their bucket boundary and partial batches are
    dropped, so only one shape per bucket is ever compiled.
    """
    boundaries = bucket_boundaries(encoded.lengths, num_buckets)
    if static_shapes:
        boundaries = boundaries + [int(encoded.lengths.max()) + 1]
    ds = tf.data.Dataset.from_tensor_slices((encoded.ids, labels))
    ds = ds.shuffle(len(encoded), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda x, y: (_features(x, tf.ones_like(x)), y))
    ds = ds.bucket_by_sequence_length(
        element_length_func=lambda x, y: tf.shape(x["token_ids"])[0],
        bucket_boundaries=boundaries,
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
        padding_values=(_features(pad_value, 0), 0),
        pad_to_bucket_boundary=static_shapes,
        drop_remainder=static_shapes,
    )
    # Bucketing hides the batch count from tf.data; stating it gives Keras a real progress bar.
    ds = ds.apply(tf.data.experimental.assert_cardinality(
        num_train_batches(encoded, batch_size, num_buckets, static_shapes)))
    return ds.prefetch(tf.data.AUTOTUNE)


def num_train_batches(encoded: Encoded, batch_size: int, num_buckets: int,
                      static_shapes: bool = False) -> int:
    """Batches per epoch of `train_dataset`: each bucket ends with one partial batch, or drops it."""
    boundaries = bucket_boundaries(encoded.lengths, num_buckets)
    bucket = np.searchsorted(np.asarray(boundaries), encoded.lengths, side="right")
    counts = np.bincount(bucket, minlength=len(boundaries) + 1)
    if static_shapes:
        return int(sum(c // batch_size for c in counts))
    return int(sum(-(-c // batch_size) for c in counts))


def sorted_dataset(encoded: Encoded, labels: np.ndarray | None, batch_size: int,
                   pad_value: int) -> tuple[tf.data.Dataset, np.ndarray]:
    """Batches in length order (minimal padding) and the order used: dataset row k = example order[k]."""
    order = np.argsort(encoded.lengths, kind="stable")
    ids = tf.gather(encoded.ids, order)
    ds = tf.data.Dataset.from_tensor_slices(ids).map(lambda x: _features(x, tf.ones_like(x)))
    if labels is not None:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(labels[order])))
        padding = (_features(pad_value, 0), 0)
    else:
        padding = _features(pad_value, 0)
    ds = ds.padded_batch(batch_size, padding_values=padding)
    return ds.prefetch(tf.data.AUTOTUNE), order


def unsort(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Puts rows computed in `order` back into source order."""
    out = np.empty_like(values)
    out[order] = values
    return out
