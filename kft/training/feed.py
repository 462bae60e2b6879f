"""What the training loop consumes: a split's token ids, labels and weights (`Feed`), and its batches.

A Feed is a split once tokenized and padded (kft.data.sources.Split holds the raw texts); its
batches are fed to the strategy's replicas in the order a BatchPlan gives.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from kft.config import Config
from kft.data import inputs
from kft.training import distribute


@dataclasses.dataclass
class Feed:
    """One tokenized split as the loop consumes it."""

    matrix: tf.Tensor  # [n, longest] int32 token ids
    lengths: np.ndarray  # [n]
    labels: np.ndarray  # [n] int32, or [n, longest] for per-position labels
    weights: np.ndarray  # [n] float32 loss weight of each example (class weights)
    sizes: np.ndarray | None = None  # [n] labelled positions per example: the loss is a per-position mean
    # [n, k] or [n, longest, k] float32 (a teacher's log-probabilities): labels become (labels, targets)
    targets: np.ndarray | None = None
    # encoder–decoder tasks: (ids [n, longest] int32, lengths [n]) of the decoder sequence, fed as
    # decoder_token_ids / decoder_padding_mask; per-position labels then align with it
    decoder: tuple | None = None
    # packed rows (--pack_sequences): [n, longest] int32 example index within each row (1, 2, ...;
    # 0 = padding), fed as segment_ids
    segments: np.ndarray | None = None
    # length buckets of the training plan, where not --num_buckets (packed rows, nearly full: one)
    buckets: int | None = None

    @classmethod
    def from_encoded(cls, encoded: inputs.Encoded, labels: np.ndarray, pad: int,
                     weights: np.ndarray | None = None) -> "Feed":
        n = len(encoded)
        return cls(inputs.padded_matrix(encoded, pad), encoded.lengths, labels.astype(np.int32),
                   (np.ones(n) if weights is None else weights).astype(np.float32))


def train_buckets(feed: Feed, config: Config) -> int:
    return feed.buckets if feed.buckets is not None else config.num_buckets


def eval_batch_size(config: Config) -> int:
    """Forward passes keep no activations for a backward pass: bigger batches use the hardware better."""
    return config.eval_batch_size or 4 * config.batch_size


def distributed_dataset(strategy: tf.distribute.Strategy, plan: inputs.BatchPlan, feed: Feed):
    """The plan's batches fed to the strategy's replicas, each pipeline building only its slices.

    One replica (one CPU or GPU): a plain dataset, which `strategy.run` accepts as it is.
    tf.distribute would wrap it in a MultiDeviceIterator whose per-device pipeline runs tf.data's
    autotuning thread with default options; deleting such an iterator waits for that thread's
    current sleep (10 ms doubling: an evaluation pass of 11.6 s took 20.5 s, see PERFORMANCE.md).
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1 and not distribute.uses_static_shapes(strategy):
        return inputs.plan_dataset(plan, feed.matrix, feed.lengths, feed.labels, feed.weights,
                                   1, None, feed.sizes, feed.targets, feed.decoder, feed.segments)

    def dataset_fn(ctx: tf.distribute.InputContext):
        local = replicas // ctx.num_input_pipelines
        ids = range(ctx.input_pipeline_id * local, (ctx.input_pipeline_id + 1) * local)
        return inputs.plan_dataset(plan, feed.matrix, feed.lengths, feed.labels, feed.weights,
                                   replicas, ids, feed.sizes, feed.targets, feed.decoder, feed.segments)

    return strategy.distribute_datasets_from_function(dataset_fn)


def in_split_order(feed: Feed, plan: inputs.BatchPlan, batches) -> np.ndarray:
    """Each batch's outputs (an iterable, one array per row of plan.indices) put back in the split's
    order: [n, k], or [n, longest, k] for per-position outputs (zero beyond each batch's width)."""
    out = None
    for rows, values in zip(plan.indices, batches):
        if out is None:
            shape = (len(feed.lengths),) + ((int(feed.lengths.max()),) if values.ndim == 3 else ()) \
                + values.shape[-1:]
            out = np.zeros(shape, values.dtype)
        keep = rows >= 0
        if values.ndim == 3:
            out[rows[keep], :values.shape[1]] = values[keep]
        else:
            out[rows[keep]] = values[keep]
    return out
