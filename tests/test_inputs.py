"""Tokenize once, group by length, pad per batch."""

import numpy as np
import pytest
import tensorflow as tf

from kft.models import backbones
from kft.data import inputs


@pytest.fixture(scope="module")
def loaded(tiny_preset):
    return backbones.load(tiny_preset)


TEXTS = ["good", "a truly wonderful film", "bad", "the plot is nothing but boilerplate", "fine film",
         "the acting is wooden and the dialogue is painful", "ok", "a lovely film with a big heart"]


def test_encode_wraps_texts_in_special_tokens_and_counts_truncation(loaded):
    enc = inputs.encode(loaded.tokenizer, loaded.packing, TEXTS, sequence_length=6)
    rows = enc.ids.to_list()
    assert all(r[0] == loaded.packing.start[0] and r[-1] == loaded.packing.end[0] for r in rows)
    raw = inputs.raw_token_lengths(loaded.tokenizer, TEXTS)
    np.testing.assert_array_equal(enc.lengths, np.minimum(raw + 2, 6))
    assert enc.truncated == int((raw > 4).sum()) > 0


def test_sequence_length_default_covers_the_99th_percentile(loaded):
    lengths = np.array([5] * 98 + [40, 200])
    cap = inputs.choose_sequence_length(lengths, loaded.packing, limit=512)
    assert cap == 48  # ceil(percentile 99 of raw = 41.6 -> 42) + 2 specials = 44, rounded up to 8
    assert inputs.choose_sequence_length(lengths, loaded.packing, limit=32) == 32


def _epoch(enc, pad, batch_size=16, num_buckets=8, seed=1, epoch=0, static=False, replicas=1):
    plan = inputs.train_plan(enc.lengths, batch_size, num_buckets, seed, epoch, static)
    matrix = inputs.padded_matrix(enc, pad)
    labels = np.arange(len(enc), dtype=np.int32)  # label = row, to see which rows a batch holds
    ds = inputs.plan_dataset(plan, matrix, enc.lengths, labels, np.ones(len(enc), np.float32), replicas)
    return plan, list(ds)


def _film_texts(n, seed=0):
    return [" ".join(["film"] * k) for k in np.random.default_rng(seed).integers(1, 30, n)]


def test_train_batches_are_padded_only_to_their_longest_text(loaded):
    enc = inputs.encode(loaded.tokenizer, loaded.packing, _film_texts(300), sequence_length=64)
    plan, batches = _epoch(enc, loaded.packing.pad)
    widths, rows, area = [], [], 0
    for (x, y, w), plan_rows in zip(batches, plan.indices):
        mask = x["padding_mask"].numpy()
        real = plan_rows >= 0
        assert mask.shape == x["token_ids"].shape == (16, mask.shape[1])
        assert mask[real].sum(axis=1).max() == mask.shape[1], "batch padded beyond its longest text"
        np.testing.assert_array_equal(mask.sum(axis=1)[real], enc.lengths[plan_rows[real]])
        assert (mask[~real] == 0).all() and (w.numpy()[~real] == 0).all()  # filler rows weigh 0
        widths.append(mask.shape[1])
        rows.extend(y.numpy()[real].tolist())
        area += mask[real].size
    assert sorted(rows) == list(range(300))  # every example exactly once, none dropped
    assert len(set(widths)) > 4  # many shapes: per-batch padding, not one fixed length
    # Grouping by length wastes far less than padding every batch to the longest text.
    assert enc.lengths.sum() / area > 0.8
    assert enc.lengths.sum() / (len(enc) * enc.lengths.max()) < 0.6


def test_epoch_order_is_a_function_of_seed_and_epoch(loaded):
    lengths = np.random.default_rng(0).integers(3, 40, 500)
    plan = lambda seed, epoch: inputs.train_plan(lengths, 8, 4, seed, epoch).indices  # noqa: E731
    np.testing.assert_array_equal(plan(7, 0), plan(7, 0))  # rebuilt identically after a restart
    assert not np.array_equal(plan(7, 0), plan(7, 1))  # reshuffled every epoch
    assert not np.array_equal(plan(7, 0), plan(8, 0))
    assert sorted(plan(7, 1)[plan(7, 1) >= 0].tolist()) == list(range(500))


def test_resuming_mid_epoch_yields_exactly_the_remaining_batches(loaded):
    lengths = np.random.default_rng(0).integers(3, 40, 200)
    plan = inputs.train_plan(lengths, 8, 4, seed=3, epoch=2)
    np.testing.assert_array_equal(plan.slice(11).indices, plan.indices[11:])
    np.testing.assert_array_equal(plan.slice(11).widths, plan.widths[11:])


def test_replica_slices_reassemble_the_global_batch_and_weights_sum_to_one(loaded):
    enc = inputs.encode(loaded.tokenizer, loaded.packing, _film_texts(100), sequence_length=64)
    plan, whole = _epoch(enc, loaded.packing.pad, batch_size=8)
    _, halves = _epoch(enc, loaded.packing.pad, batch_size=8, replicas=2)
    assert len(halves) == 2 * len(whole)
    for k, (x, y, w) in enumerate(whole):
        (x0, y0, w0), (x1, y1, w1) = halves[2 * k], halves[2 * k + 1]
        np.testing.assert_array_equal(np.concatenate([x0["token_ids"], x1["token_ids"]]), x["token_ids"])
        np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
        assert float(np.sum(w0) + np.sum(w1)) == pytest.approx(1.0)  # weighted sum = global mean


def test_static_shapes_pad_to_bucket_edges_and_drop_nothing(loaded):
    enc = inputs.encode(loaded.tokenizer, loaded.packing, _film_texts(200, seed=1), sequence_length=64)
    plan, batches = _epoch(enc, loaded.packing.pad, batch_size=8, num_buckets=4, static=True)
    edges = set(inputs.bucket_edges(enc.lengths, 4).tolist())
    shapes = {tuple(x["token_ids"].shape) for x, _, _ in batches}
    assert all(b == 8 for b, _ in shapes)
    assert {w for _, w in shapes} <= edges and len(edges) <= 4
    assert sorted(plan.indices[plan.indices >= 0].tolist()) == list(range(200))


def test_tokenization_happens_once_not_per_epoch(loaded, monkeypatch):
    calls = []
    real = inputs._graph_tokenizer

    def counting(tokenizer):
        calls.append(1)
        return real(tokenizer)

    monkeypatch.setattr(inputs, "_graph_tokenizer", counting)
    enc = inputs.encode(loaded.tokenizer, loaded.packing, TEXTS, sequence_length=16)
    for epoch in range(3):
        _, batches = _epoch(enc, 0, batch_size=4, num_buckets=2, epoch=epoch)
        assert batches
    assert len(calls) == 1
    # The dataset holds integer ids, never strings.
    ds = inputs.plan_dataset(inputs.eval_plan(enc.lengths, 4), inputs.padded_matrix(enc, 0),
                             enc.lengths, np.zeros(len(TEXTS), np.int32), np.ones(len(TEXTS)))
    assert all(spec.dtype == tf.int32 for spec in tf.nest.flatten(ds.element_spec[0]))


def test_eval_plan_sorts_by_length_and_maps_back(loaded):
    enc = inputs.encode(loaded.tokenizer, loaded.packing, TEXTS, sequence_length=32)
    plan = inputs.eval_plan(enc.lengths, batch_size=3)
    rows = plan.indices[plan.indices >= 0]
    assert sorted(rows.tolist()) == list(range(len(TEXTS)))
    assert list(enc.lengths[rows]) == sorted(enc.lengths)


def test_per_position_labels_are_cut_with_the_batch_and_weighted_per_position(loaded):
    enc = inputs.encode(loaded.tokenizer, loaded.packing, _film_texts(60, seed=2), sequence_length=64)
    matrix = inputs.padded_matrix(enc, loaded.packing.pad)
    labels = np.where(np.arange(matrix.shape[1])[None] < enc.lengths[:, None] - 1, 1, -1).astype(np.int32)
    sizes = (labels >= 0).sum(axis=1)
    plan = inputs.train_plan(enc.lengths, 8, 4, seed=0, epoch=0)
    for (x, y, w), rows in zip(inputs.plan_dataset(plan, matrix, enc.lengths, labels, np.ones(len(sizes)),
                                                   sizes=sizes).as_numpy_iterator(), plan.indices):
        assert y.shape == x["token_ids"].shape  # labels cut to the batch's width, like the ids
        real = rows >= 0
        # weight x positions sums to 1: the summed per-example losses become a per-position mean
        assert float(np.sum(w[real] * sizes[rows[real]])) == pytest.approx(1.0)


def test_one_replica_input_pipelines_run_without_tf_data_autotuning():
    """tf.data's autotuning thread sleeps 10 ms, 20 ms, 40 ms, ... and deleting an iterator waited out
    the current sleep: ~1 s after a 1.7 s pass, ~9 s after an 11.6 s SST-2 evaluation pass (measured
    in PERFORMANCE.md). A wall-clock bound on deletion was too noisy for a shared CI machine, so this
    checks the two things that remove the wait: one replica gets a plain dataset (no
    MultiDeviceIterator with its own default-option pipeline) and that dataset has autotuning off."""
    from kft.training import loop

    rng = np.random.default_rng(0)
    n = 64
    lengths = rng.integers(2, 9, size=n)
    split = loop.Feed(tf.constant(rng.integers(1, 50, size=(n, 8)), tf.int32), lengths,
                      np.zeros(n, np.int32), np.ones(n, np.float32))
    plan = inputs.eval_plan(lengths, 16, 2, False)
    dataset = loop.distributed_dataset(tf.distribute.OneDeviceStrategy("/cpu:0"), plan, split)
    assert isinstance(dataset, tf.data.Dataset)
    assert dataset.options().autotune.enabled is False
    batches = list(dataset.as_numpy_iterator())  # and it still yields every planned batch
    assert len(batches) == len(plan.indices)
