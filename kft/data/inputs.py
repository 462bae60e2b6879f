"""Tokenize once, then feed length-grouped, per-batch padded batches.

Texts are tokenized a single time into token ids (with the backbone's start/end tokens); epochs
reuse those ids. A `BatchPlan` says which rows form each batch: training groups examples of similar
length (buckets whose boundaries come from the data), shuffled as a pure function of (seed, epoch) so
a resumed run can rebuild any epoch and skip to any batch; evaluation sorts by length. Each batch is
padded only to its own longest example (or to its bucket's edge when shapes must be static).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow as tf

from kft.models.backbones import Packing
from kft.config import FlagError

_CHUNK = 4096  # texts per tokenizer call: bounds peak memory on long documents
# Characters kept per text before tokenizing. 512 word pieces never need more than a few
# thousand characters; the cap keeps a stray megabyte-long row from costing memory and time.
MAX_TEXT_CHARS = 100_000


@dataclasses.dataclass
class Encoded:
    """Token ids of one split, unpadded."""

    ids: tf.RaggedTensor  # [n, (length)] int32, special tokens included
    lengths: np.ndarray  # [n] tokens per example after truncation
    truncated: int  # examples cut to fit sequence_length
    cut_chars: int = 0  # examples longer than MAX_TEXT_CHARS characters, cut before tokenizing

    def __len__(self) -> int:
        return int(self.lengths.shape[0])


@functools.lru_cache(maxsize=8)  # one traced function per tokenizer, however many calls
def _graph_tokenizer(tokenizer):
    """The tokenizer as a graph function: returns ragged ids (eager calls would give Python lists)."""
    if _needs_eager(tokenizer):
        return lambda texts: _eager_ids(tokenizer, texts)
    return tf.function(lambda texts: tokenizer(texts),
                       input_signature=[tf.TensorSpec([None], tf.string)])


def _needs_eager(tokenizer) -> bool:
    """keras-hub's byte-level BPE tokenizer must run eagerly to give reproducible ids.

    It memoises merged words in a mutable hash table. Inside a tf.function the lookup that should
    read this call's inserts is not ordered after them, and the ids of a text change from run to run
    (measured on DialogSum prompts with SmolLM2's tokenizer: 308 tokens in one process, 333 in the
    next, for the same text). Eagerly the ops run in order, and here it was faster too (0.16 s
    for 1,000 DialogSum prompts against about 36 s traced).
    """
    import keras_hub

    return isinstance(tokenizer, keras_hub.tokenizers.BytePairTokenizer)


def _eager_ids(tokenizer, texts: tf.Tensor) -> tf.RaggedTensor:
    rows = tokenizer(texts)
    if isinstance(rows, (tf.RaggedTensor, tf.Tensor)):
        return tf.RaggedTensor.from_tensor(rows) if isinstance(rows, tf.Tensor) else rows
    lengths = np.fromiter((len(r) for r in rows), np.int64, count=len(rows))
    values = np.fromiter((int(i) for r in rows for i in r), np.int32, count=int(lengths.sum()))
    return tf.RaggedTensor.from_row_lengths(values, lengths)


def word_pieces(tokenizer, texts: list[str]) -> tf.RaggedTensor:
    """Word-piece ids of each text ([n, (pieces)] int32): no special tokens, no truncation.

    Texts longer than MAX_TEXT_CHARS characters are cut first (count them with `count_cut`).
    """
    tokenize = _graph_tokenizer(tokenizer)
    chunks = [tf.cast(tokenize(tf.constant([t[:MAX_TEXT_CHARS] for t in texts[i:i + _CHUNK]])), tf.int32)
              for i in range(0, len(texts), _CHUNK)]
    if not chunks:
        return tf.RaggedTensor.from_row_lengths(tf.zeros([0], tf.int32), tf.zeros([0], tf.int64))
    return tf.concat(chunks, axis=0) if len(chunks) > 1 else chunks[0]


def count_cut(texts: list[str]) -> int:
    return sum(len(t) > MAX_TEXT_CHARS for t in texts)


def raw_token_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Word-piece counts of texts, without special tokens or truncation."""
    return word_pieces(tokenizer, texts).row_lengths().numpy()


def choose_sequence_length(raw_lengths: np.ndarray, packing: Packing, limit: int,
                           percentile: float = 99.0) -> int:
    """A cap covering `percentile`% of the training texts, rounded up to 8, at most `limit`."""
    specials = len(packing.start) + len(packing.end)
    cap = int(np.ceil(np.percentile(raw_lengths, percentile))) + specials
    cap = int(np.ceil(cap / 8) * 8)
    return max(8, min(cap, limit))


def check_lengths(sequence_length: int, serving_length: int, limit: int) -> None:
    """Refuses a training or serving token cap beyond the backbone's position limit."""
    for flag, value in (("sequence_length", sequence_length), ("serving_sequence_length", serving_length)):
        if value > limit:
            raise FlagError(f"--{flag}={value} exceeds the backbone's limit of {limit} positions")


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


def pack_pieces(pieces: tf.RaggedTensor, packing: Packing, sequence_length: int,
                cut_chars: int = 0) -> Encoded:
    """Wraps word pieces in special tokens, truncating to `sequence_length`; counts truncations."""
    room = sequence_length - len(packing.start) - len(packing.end)
    truncated = int(np.sum(pieces.row_lengths().numpy() > room))
    ids = pack(pieces, packing, sequence_length)
    return Encoded(ids, ids.row_lengths().numpy(), truncated, cut_chars)


def encode(tokenizer, packing: Packing, texts: list[str], sequence_length: int) -> Encoded:
    """Tokenizes every text once; counts the ones longer than `sequence_length`."""
    return pack_pieces(word_pieces(tokenizer, texts), packing, sequence_length, count_cut(texts))


def bucket_boundaries(lengths: np.ndarray, num_buckets: int) -> list[int]:
    """Upper bounds (exclusive) splitting the length distribution into ~equal-count buckets."""
    if num_buckets <= 1:
        return []
    qs = np.percentile(lengths, np.linspace(0, 100, num_buckets + 1)[1:-1])
    return sorted({int(q) + 1 for q in qs if q + 1 <= lengths.max()})


def _features(ids, mask):
    return {"token_ids": ids, "padding_mask": mask}


@dataclasses.dataclass
class BatchPlan:
    """Which examples form each batch of one pass, and how wide each batch is padded.

    Every batch has exactly `batch_size` rows: a bucket's last, partial batch is filled with
    padding rows (index -1, loss weight 0), so no example is dropped and the batch dimension is
    static (what TPUs and XLA need) without `drop_remainder`.
    """

    indices: np.ndarray  # [num_batches, batch_size] int32 rows of the split; -1 = padding row
    widths: np.ndarray  # [num_batches] int32 padded sequence length of each batch

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def slice(self, start: int) -> "BatchPlan":
        return BatchPlan(self.indices[start:], self.widths[start:])


def _fill(rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Rows cut into batches of batch_size, the last one filled with -1."""
    n = -(-len(rows) // batch_size) * batch_size
    return np.concatenate([rows, np.full(n - len(rows), -1, rows.dtype)]).reshape(-1, batch_size)


def _widths(indices: np.ndarray, lengths: np.ndarray, edges: np.ndarray | None) -> np.ndarray:
    longest = np.where(indices >= 0, lengths[np.maximum(indices, 0)], 0).max(axis=1)
    if edges is None:
        return longest.astype(np.int32)
    # Static shapes: pad to the bucket's upper edge, so at most one shape per bucket exists.
    return edges[np.searchsorted(edges, longest)].astype(np.int32)


def bucket_edges(lengths: np.ndarray, num_buckets: int) -> np.ndarray:
    """The padded widths used with static shapes: each bucket's longest allowed length."""
    return np.asarray(sorted({b - 1 for b in bucket_boundaries(lengths, num_buckets)}
                             | {int(lengths.max())}), np.int64)


def train_plan(lengths: np.ndarray, batch_size: int, num_buckets: int, seed: int, epoch: int,
               static_shapes: bool = False) -> BatchPlan:
    """Epoch `epoch`'s batches: a pure function of (seed, epoch), so a resumed run can rebuild
    exactly the batches an uninterrupted run would see, and skip to any position in them.

    Examples are shuffled, grouped into length buckets (boundaries from the data), cut into
    batches within each bucket, and the batches shuffled; each batch pads only to its own longest
    example (or, with `static_shapes`, to its bucket's edge).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).astype(np.int32)
    bucket = np.searchsorted(np.asarray(bucket_boundaries(lengths, num_buckets)), lengths[order],
                             side="right")
    batches = [_fill(order[bucket == b], batch_size) for b in np.unique(bucket)]
    indices = np.concatenate(batches)[rng.permutation(sum(len(b) for b in batches))]
    edges = bucket_edges(lengths, num_buckets) if static_shapes else None
    return BatchPlan(indices, _widths(indices, lengths, edges))


def eval_plan(lengths: np.ndarray, batch_size: int, num_buckets: int = 16,
              static_shapes: bool = False) -> BatchPlan:
    """Batches in length order (least padding); the rows of a prediction map back via indices."""
    indices = _fill(np.argsort(lengths, kind="stable").astype(np.int32), batch_size)
    edges = bucket_edges(lengths, num_buckets) if static_shapes else None
    return BatchPlan(indices, _widths(indices, lengths, edges))


def padded_matrix(encoded: Encoded, pad_value: int) -> tf.Tensor:
    """[n, longest] int32 token ids: tokenized once, gathered into batches by the plans."""
    return encoded.ids.to_tensor(default_value=pad_value)


def plan_dataset(plan: BatchPlan, matrix: tf.Tensor, lengths: np.ndarray, labels: np.ndarray,
                 example_weights: np.ndarray, num_replicas: int = 1, replica_ids=None,
                 sizes: np.ndarray | None = None, targets: np.ndarray | None = None,
                 decoder: tuple | None = None, segments: np.ndarray | None = None) -> tf.data.Dataset:
    """Per-replica batches of `plan`, as (features, labels, weights).

    With `decoder` ((ids [n, longest], lengths [n]): an encoder–decoder task's second sequence) the
    features also hold decoder_token_ids and decoder_padding_mask, cut to the batch's longest decoder
    sequence, and per-position labels follow the decoder's width instead of the encoder's. That
    width is the batch's own even with static shapes (XLA then compiles one program per width met).

    With `targets` ([n, k] or [n, longest, k] floats, e.g. a teacher's outputs) labels are the pair
    (labels, targets), per-position targets cut to the batch width like the ids.

    `labels` is [n] (one per example) or [n, longest] (one per position, cut to each batch's width).

    With `segments` ([n, longest] int32: packed rows' example index per position) the features also
    hold segment_ids, cut like the ids.

    Each global batch is cut into `num_replicas` equal slices; this pipeline yields the slices of
    `replica_ids` (default: all), in order, which is how tf.distribute hands consecutive elements
    to the replicas it feeds. `weights` are the example weights divided by the number of real
    examples in the global batch, so summing the replicas' weighted losses gives the global mean.
    With `sizes` (labelled positions per example; the loss then sums over an example's positions)
    they divide by the global batch's labelled positions instead: a per-position mean.
    """
    n_batches, batch_size = plan.indices.shape
    if batch_size % num_replicas:
        raise ValueError(f"batch of {batch_size} rows does not split over {num_replicas} replicas")
    valid = plan.indices >= 0
    per_example = np.where(valid, example_weights[np.maximum(plan.indices, 0)], 0.0)
    if sizes is None:
        count = valid.sum(axis=1, keepdims=True)
    else:
        count = np.where(valid, np.asarray(sizes)[np.maximum(plan.indices, 0)], 0).sum(axis=1, keepdims=True)
    weights = per_example / np.maximum(count, 1)
    replica_ids = list(range(num_replicas)) if replica_ids is None else list(replica_ids)
    shape = (n_batches, num_replicas, batch_size // num_replicas)
    indices = plan.indices.reshape(shape)[:, replica_ids].reshape(-1, shape[2])
    weights = weights.reshape(shape)[:, replica_ids].reshape(-1, shape[2]).astype(np.float32)
    widths = np.repeat(plan.widths, len(replica_ids))
    lengths = tf.constant(lengths, tf.int32)
    labels = tf.constant(labels, tf.int32)
    targets = None if targets is None else tf.constant(targets, tf.float32)
    if decoder is not None:
        decoder_ids, decoder_lengths = tf.constant(decoder[0], tf.int32), tf.constant(decoder[1], tf.int32)
    segments = None if segments is None else tf.constant(segments, tf.int32)

    def make(rows, width, w):
        safe = tf.maximum(rows, 0)
        ids = tf.gather(matrix, safe)[:, :width]
        n = tf.where(rows >= 0, tf.gather(lengths, safe), 0)
        mask = tf.cast(tf.range(width)[None, :] < n[:, None], tf.int32)
        features = _features(ids, mask)
        if segments is not None:
            features["segment_ids"] = tf.gather(segments, safe)[:, :width]
        label_width = width
        if decoder is not None:
            m = tf.where(rows >= 0, tf.gather(decoder_lengths, safe), 0)
            label_width = tf.maximum(tf.reduce_max(m), 1)
            features["decoder_token_ids"] = tf.gather(decoder_ids, safe)[:, :label_width]
            features["decoder_padding_mask"] = tf.cast(tf.range(label_width)[None, :] < m[:, None], tf.int32)
        batch_labels = tf.gather(labels, safe)
        if labels.shape.rank == 2:  # one label per position (token tasks): cut like the ids
            batch_labels = batch_labels[:, :label_width]
        if targets is not None:
            batch_targets = tf.gather(targets, safe)
            if targets.shape.rank == 3:
                batch_targets = batch_targets[:, :width]
            batch_labels = (batch_labels, batch_targets)
        return features, batch_labels, w

    ds = tf.data.Dataset.from_tensor_slices((indices, widths, weights))
    # Fixed parallelism and no autotuning: a batch is one gather, and tf.data's autotuning thread
    # makes deleting the iterator wait for its current sleep (up to tens of seconds; an evaluation
    # pass of 11.6 s took 20.5 s). Measured in PERFORMANCE.md.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.map(make, num_parallel_calls=2, deterministic=True).prefetch(2).with_options(options)


def char_offsets(text: tf.Tensor, byte_start: tf.RaggedTensor, byte_end: tf.RaggedTensor):
    """Byte offsets of words in their texts -> character offsets (UTF-8 aware)."""
    repeated = tf.gather(text, byte_start.value_rowids())

    def chars(offsets):
        prefix = tf.strings.substr(repeated, tf.zeros_like(offsets.flat_values), offsets.flat_values)
        return offsets.with_flat_values(tf.strings.length(prefix, unit="UTF8_CHAR"))

    return chars(byte_start), chars(byte_end)
